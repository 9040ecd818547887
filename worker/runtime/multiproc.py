"""Set up prometheus_client's multiprocess mode for ``ldmq worker`` (see ``worker.runtime.metrics``).

This module must not import prometheus_client: the mode is chosen when prometheus_client is first
imported, from ``PROMETHEUS_MULTIPROC_DIR``, so :func:`prepare` runs first, in the ``ldmq worker``
process, and the worker's pool processes (forked) and executor children (spawned) inherit it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(port_value: str | None = None) -> Path | None:
    """With worker metrics on (``LDMQ_WORKER_METRICS_PORT``), point ``PROMETHEUS_MULTIPROC_DIR``
    at an empty directory: the one given (its ``*.db`` files from an earlier run are removed, so
    give each worker its own), else a private temporary one removed at exit. Returns it, or None
    when metrics are off. Raises RuntimeError when prometheus_client is already imported."""
    raw = (port_value if port_value is not None else os.environ.get("LDMQ_WORKER_METRICS_PORT", "")).strip()
    if raw in ("", "0"):
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError("worker.runtime.multiproc.prepare() must run before prometheus_client is imported")
    given = os.environ.get(ENV, "").strip()
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="ldmq-worker-metrics-"))
        atexit.register(shutil.rmtree, path, True)
        os.environ[ENV] = str(path)
    return path
