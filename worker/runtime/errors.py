"""Why a run stopped, as exceptions, and the one place that sorts them.

- Raised by ``JobRun.check()`` between steps: :class:`JobCanceled`, :class:`JobTimeout`,
  :class:`JobInterrupted` (shutdown), and ``shared.jobstate.LeaseLost``; at a checkpoint also
  :class:`JobPreempted`.
- Raised by the job itself: ``worker.jobs.base.JobError`` (its own fault: final, with a code).
- Raised by the output writer process on its way back (:func:`raise_kind`): the same kinds as
  in-process work would have raised, plus :class:`DatabaseUnreachable` and :class:`WorkerProcessDied`.

:func:`error_kind` is the only classifier of an exception; ``worker.runtime.outcome.classify``
maps its kinds to how the job ends, and the writer sends the kind across its pipe.
"""

from __future__ import annotations

from shared.jobstate import LeaseLost
from shared.storage import StorageError, StorageUnavailable
from worker.jobs.base import HelperDied, JobError


class JobCanceled(Exception):
    """The user asked to cancel; raised between denoising or training steps."""


class JobTimeout(Exception):
    pass


class JobInterrupted(Exception):
    """The worker is shutting down (SIGTERM): stop between steps, checkpoint, give the job back."""


class JobPreempted(Exception):
    """Asked to yield (``worker.runtime.preemption``) and now at a checkpoint: give the job back,
    as for a shutdown, so that the waiting work it yields to can run."""


class DatabaseUnreachable(Exception):
    """The writer could not reach the database (classified as transient, like the error it stands for)."""


class WorkerProcessDied(Exception):
    """A helper process of the executor died while it held a job's work."""


def is_transient_db_error(exc: BaseException) -> bool:
    """The database was unreachable (not a bug, not the job's fault)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout, DatabaseUnreachable)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg

        return isinstance(exc, psycopg.OperationalError)
    except ImportError:  # pragma: no cover
        return False


def error_kind(exc: BaseException) -> str:
    """One word for what ``exc`` means to the run: lease_lost, canceled, interrupted, preempted, timeout,
    process_died, job_error, storage_unavailable, storage_error, db_unreachable, or internal (anything
    else: a bug, logged with its traceback)."""
    if isinstance(exc, LeaseLost):
        return "lease_lost"
    if isinstance(exc, JobCanceled):
        return "canceled"
    if isinstance(exc, JobInterrupted):
        return "interrupted"
    if isinstance(exc, JobPreempted):
        return "preempted"
    if isinstance(exc, JobTimeout):
        return "timeout"
    if isinstance(exc, (WorkerProcessDied, HelperDied)):
        return "process_died"
    if isinstance(exc, JobError):
        return "job_error"
    if isinstance(exc, StorageUnavailable):
        return "storage_unavailable"
    if isinstance(exc, StorageError):
        return "storage_error"
    if is_transient_db_error(exc):
        return "db_unreachable"
    return "internal"


def raise_kind(kind: str, message: str, public: str | None, job_id: str):
    """Raise again, in this process, an error another process reported as ``(kind, message,
    public)`` (``public``: a storage error's text for the tenant)."""
    if kind == "lease_lost":
        raise LeaseLost(job_id)
    if kind == "storage_unavailable":
        raise StorageUnavailable(message, public=public)
    if kind == "storage_error":
        exc = StorageError(message)
        if public:
            exc.public = public
        raise exc
    if kind == "db_unreachable":
        raise DatabaseUnreachable(message)
    raise RuntimeError(f"writing outputs failed: {message}")
