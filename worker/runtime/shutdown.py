"""Worker shutdown, as one flag: set from Celery's SIGTERM/SIGINT handler (``worker.tasks``), read
by every task thread and by ``worker.runtime.executor`` between polls of a running job, which then
stops it at its next step, checkpoints and gives the job back."""

from __future__ import annotations

# Set (from a signal handler: a plain attribute, no locks) when the worker is shutting down; every
# task thread of the worker process sees it.
_shutdown = {"requested": False}


def request_shutdown() -> None:
    _shutdown["requested"] = True


def shutdown_requested() -> bool:
    return _shutdown["requested"]
