"""`ldmq tenants set|get|list` against the real database, and `ldmq usage` / the usage lines of
`ldmq jobs list` against the real app (in-process, as tests/ldmq/test_client.py does)."""

from __future__ import annotations

import json

import pytest

from ldmq import cli
from ldmq.client import Client


@pytest.fixture
def operator(settings, monkeypatch, capsys, keep_root_logging):
    """``ldmq ARGS`` in-process with the test database as its settings: (rc, stdout, stderr)."""
    from shared.settings import get_settings

    monkeypatch.setenv("LDMQ_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("LDMQ_RATE_PER_S", "7")
    get_settings.cache_clear()

    def run(*argv):
        rc = cli.main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    yield run
    get_settings.cache_clear()


def test_set_get_list_and_clear(operator, make_tenant, settings):
    name = f"acme-{settings.storage_url[-8:]}"
    make_tenant(name)
    rc, out, err = operator("tenants", "set", "--tenant", name, "--weight", "2.5", "--max-running", "4",
                            "--max-queued-images", "500", "--rate", "20", "--burst", "40")
    assert rc == 0, err
    assert name in out and "2.5" in out and "500" in out
    rc, out, _ = operator("tenants", "get", "--tenant", name, "--json")
    got = json.loads(out)
    assert {k: got[k] for k in ("weight", "max_running", "max_queued_images", "rate_per_s", "rate_burst")} == {
        "weight": 2.5, "max_running": 4, "max_queued_images": 500, "rate_per_s": 20.0, "rate_burst": 40}
    assert got["effective_rate"] == {"rate_per_s": 20.0, "rate_burst": 40}

    # --rate 0 and 'none' clear: the deployment's LDMQ_RATE_PER_S (7 here) applies, marked '*'.
    assert operator("tenants", "set", "--tenant", name, "--rate", "0", "--burst", "none", "--max-running", "none")[0] == 0
    rc, out, _ = operator("tenants", "get", "--tenant", name, "--json")
    got = json.loads(out)
    assert (got["rate_per_s"], got["rate_burst"], got["max_running"]) == (None, None, None)
    assert got["effective_rate"] == {"rate_per_s": 7.0, "rate_burst": 7}
    rc, out, _ = operator("tenants", "list")
    line = next(line for line in out.splitlines() if line.startswith(name))
    assert line.split()[1:] == ["2.5", "unlimited", "500", "7*", "7"]
    assert "LDMQ_RATE_PER_S" in out
    rc, out, _ = operator("tenants", "list", "--json")
    assert name in [t["name"] for t in json.loads(out)]


def test_bad_values_unknown_tenant_and_nothing_to_set(operator, make_tenant, settings):
    name = f"beta-{settings.storage_url[-8:]}"
    other = f"secretco-{settings.storage_url[-8:]}"
    make_tenant(name)
    make_tenant(other)
    rc, out, err = operator("tenants", "set", "--tenant", name, "--weight", "0", "--max-running", "-1", "--burst", "x")
    assert rc == 2
    assert "weight must be a number > 0" in err and "max_running must be a whole number from 0" in err
    assert "rate_burst: 'x' is not a whole number" in err
    rc, out, _ = operator("tenants", "get", "--tenant", name, "--json")
    assert json.loads(out)["weight"] == 1.0  # nothing changed
    rc, out, err = operator("tenants", "set", "--tenant", "nobody", "--weight", "2")
    assert rc == 2 and "no tenant named 'nobody'" in err and other not in err and name not in err
    rc, out, err = operator("tenants", "set", "--tenant", name)
    assert rc == 2 and "nothing to set" in err and "--max-queued-images" in err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tenants", "set", "--help"])
    assert "ldmq tenants set --tenant acme --weight 2" in capsys.readouterr().out


def test_usage_and_the_usage_lines_of_jobs_list(client, settings, tiny_model, monkeypatch, capsys, keep_root_logging):
    from shared import tenants
    from shared.db import session_scope
    from shared.models import Tenant

    tid, key, model_id = tiny_model
    with session_scope(settings) as s:
        tenants.set_tenant_settings(s, s.get(Tenant, tid).name, {"max_queued_images": 100, "weight": 3})
    api = Client(key=key, http=client)
    job = api.submit_sample(model_id, [{"prompt": "a", "num_images": 3}], steps=2)
    monkeypatch.setattr(cli, "_client", lambda args: api)
    monkeypatch.setattr(api, "close", lambda: None)

    assert cli.main(["usage", "--json"]) == 0
    u = json.loads(capsys.readouterr().out)
    assert (u["jobs_queued"], u["images_queued"], u["weight"], u["quotas"]["max_queued_images"]) == (1, 3, 3.0, 100)
    assert cli.main(["usage"]) == 0
    out = capsys.readouterr().out
    assert "weight 3" in out and "images queued 3 (max 100)" in out and "request rate: unlimited" in out

    assert cli.main(["jobs", "list"]) == 0
    got = capsys.readouterr()
    assert got.out.startswith(job.id)  # stdout: one job a line, as before
    assert "images queued 3 (max 100)" in got.err.splitlines()[1]
    assert cli.main(["jobs", "list", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [job.id]
