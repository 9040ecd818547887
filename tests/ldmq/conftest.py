"""What the CLI tests share: running ``ldmq`` in process against a given client, and keeping the
root logger as it was (the CLI configures logging)."""

from __future__ import annotations

import logging

import pytest

from ldmq import cli


def run_cli(monkeypatch, capsys, api, *argv):
    """``ldmq *argv`` in process, talking to ``api`` (a Client); its exit code, stdout and stderr."""
    monkeypatch.setattr(cli, "_client", lambda args: api)
    monkeypatch.setattr(api, "close", lambda: None)
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def keep_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
