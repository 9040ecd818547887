"""The life of one job run: claim in the database, heartbeat the lease, do the work, record the
final state. The Celery message only wakes us up; everything that counts is fenced by the
attempt number the claim returned (see ``shared.jobstate``).

Two ways to run the work share this module:

- ``run_job`` runs it in the calling process (tests, tools);
- ``worker.executor.execute_job`` (what the Celery tasks call) claims and heartbeats here, in the
  worker process, and runs the work in a spawned executor process (see that module).

Either way the work gets a :class:`JobRun`: cooperative checks between steps (``check()``), and
fenced writes. How a run ended is an :class:`Outcome`; :func:`record_outcome` writes it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import jobstate
from shared.db import session_scope
from shared.jobstate import Claim, LeaseLost
from shared.models import JobStatus
from shared.settings import Settings
from shared.storage import StorageError, StorageUnavailable
from worker.outputs import DatabaseUnreachable, WorkerProcessDied

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """The user asked to cancel; raised between denoising or training steps."""


class JobTimeout(Exception):
    pass


class JobInterrupted(Exception):
    """The worker is shutting down (SIGTERM): stop between steps, checkpoint, give the job back."""


class JobError(Exception):
    """A failure that is the job's own (bad data, missing model): final, with a clear message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def time_limit_s(settings: Settings, job_type: str) -> float:
    return float(settings.train_time_limit_s if job_type == "train" else settings.sample_time_limit_s)


# Why a run must stop, as the executor tells its child (see worker.executor).
STOP_REASONS = ("cancel", "lease_lost", "shutdown", "timeout")


class JobRun:
    """Handle given to the work function: cooperative checks, fenced progress and writes.

    With ``heartbeat=True`` a thread renews the lease every ``heartbeat_seconds``, polls for a
    cancel about once a second, and declares the lease lost when another run took the job or when
    no renewal succeeded for ``lease_seconds`` (the database was unreachable: someone else may
    hold the job by now). ``external_stop`` lets a supervisor add its own reasons to stop.
    """

    def __init__(self, settings: Settings, claim: Claim, job_type: str, owner: str, *, heartbeat: bool = True,
                 external_stop: Callable[[], str | None] | None = None, enforce_time_limit: bool = True):
        self.settings = settings
        self.claim = claim
        self.job_id = claim.job_id
        self.attempt = claim.attempt
        self.job_type = job_type
        self.owner = owner
        self.time_limit_s = time_limit_s(settings, job_type)
        # A supervisor that times the run itself (worker.executor) turns this clock off.
        self.deadline = time.monotonic() + self.time_limit_s if enforce_time_limit else float("inf")
        self._external_stop = external_stop
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat = heartbeat
        self.last_renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)

    # -- heartbeat --------------------------------------------------------------------------
    def start(self) -> None:
        if self._heartbeat:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        tick = min(1.0, self.settings.heartbeat_seconds)
        next_renew = time.monotonic() + self.settings.heartbeat_seconds
        failures = 0
        while not self._stop.wait(tick):
            try:
                with session_scope(self.settings) as s:
                    if time.monotonic() >= next_renew:
                        cancel = jobstate.heartbeat(s, self.job_id, self.attempt, self.settings.lease_seconds)
                        self.last_renewed = time.monotonic()
                        next_renew = self.last_renewed + self.settings.heartbeat_seconds
                    else:
                        cancel = jobstate.cancel_requested(s, self.job_id, self.attempt)
                failures = 0
                if cancel:
                    self._cancel.set()
            except LeaseLost:
                log.warning("job %s attempt %s: lease lost (another run owns the job); stopping", self.job_id,
                            self.attempt)
                self._lost.set()
                return
            except Exception as exc:
                # A database blip: keep trying until the lease would have run out, then stop the run.
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("job %s: heartbeat failed (%d): %s", self.job_id, failures, exc)
                if time.monotonic() - self.last_renewed > self.settings.lease_seconds:
                    log.warning("job %s attempt %s: lease not renewed for %s s; stopping the run", self.job_id,
                                self.attempt, self.settings.lease_seconds)
                    self._lost.set()
                    return

    # -- checks between steps -----------------------------------------------------------------
    def stop_reason(self) -> str | None:
        """Why this run must stop now, or None: one of ``STOP_REASONS``."""
        if self._lost.is_set():
            return "lease_lost"
        if self._cancel.is_set():
            return "cancel"
        if self._external_stop is not None:
            reason = self._external_stop()
            if reason:
                return reason
        if time.monotonic() > self.deadline:
            return "timeout"
        return None

    def check(self) -> None:
        """Raise if this run must stop: lease lost, cancel requested, shutdown, or time limit passed."""
        reason = self.stop_reason()
        if reason is None:
            return
        if reason == "lease_lost":
            raise LeaseLost(self.job_id)
        if reason == "cancel":
            raise JobCanceled(self.job_id)
        if reason == "shutdown":
            raise JobInterrupted(self.job_id)
        raise JobTimeout(f"the job ran past its time limit of {self.time_limit_s:g} s")

    def poll_cancel(self) -> None:
        """Ask the database now (not only at the next heartbeat) whether to stop."""
        with session_scope(self.settings) as s:
            if jobstate.cancel_requested(s, self.job_id, self.attempt):
                self._cancel.set()
        self.check()

    # -- fenced writes ----------------------------------------------------------------------------
    def progress(self, fraction: float, detail: dict[str, Any] | None = None) -> None:
        with session_scope(self.settings) as s:
            jobstate.set_progress(s, self.job_id, self.attempt, fraction, detail)

    def record_output(self, **kwargs) -> bool:
        with session_scope(self.settings) as s:
            return jobstate.record_output(s, self.job_id, self.attempt, **kwargs)

    def set_checkpoint(self, key: str) -> None:
        with session_scope(self.settings) as s:
            jobstate.set_checkpoint(s, self.job_id, self.attempt, key)


# ================================================================================================
# How a run ended, and writing it down
# ================================================================================================

@dataclass
class Outcome:
    """``kind``: succeeded | failed | canceled (final states); lease_lost (another run owns the
    job: write nothing); released (give the job back now, the attempt refunded: shutdown, or the
    database went away); crashed (the run's process died: spend the attempt, requeue or fail)."""

    kind: str
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "error": self.error, "extra": self.extra, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        return cls(d["kind"], d.get("error"), d.get("extra") or {}, d.get("reason", ""))


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


def classify(exc: BaseException | None, extra: dict[str, Any] | None = None, job_id: str = "") -> Outcome:
    """Map how the work ended (its exception, or None for success) to an Outcome."""
    if exc is None:
        return Outcome("succeeded", extra=extra or {})
    if isinstance(exc, LeaseLost):
        return Outcome("lease_lost", reason="another run owns the job")
    if isinstance(exc, JobCanceled):
        return Outcome("canceled")
    if isinstance(exc, JobInterrupted):
        return Outcome("released", reason="worker shutdown")
    if isinstance(exc, JobTimeout):
        return Outcome("failed", {"code": "timeout", "message": str(exc)})
    if isinstance(exc, WorkerProcessDied):
        return Outcome("crashed", {"code": "writer_died", "message": str(exc)})
    if isinstance(exc, JobError):
        return Outcome("failed", {"code": exc.code, "message": str(exc)})
    if isinstance(exc, StorageUnavailable):
        return Outcome("failed", {"code": "storage_unavailable", "message": str(exc)})
    if isinstance(exc, StorageError):
        return Outcome("failed", {"code": "storage_error", "message": f"object storage failed: {exc}"})
    if is_transient_db_error(exc):
        return Outcome("released", reason="database unreachable")
    log.error("job %s failed", job_id, exc_info=exc)
    return Outcome("failed", {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})


def db_retry(settings: Settings, what: str, fn: Callable[[], Any], budget_s: float | None = None) -> Any:
    """Run a database write, retrying while the database is unreachable (bounded)."""
    budget = budget_s if budget_s is not None else max(60.0, 2.0 * settings.lease_seconds)
    deadline = time.monotonic() + budget
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)


def record_outcome(settings: Settings, claim: Claim, job_type: str, outcome: Outcome) -> str:
    """Write how the run ended (fenced by its attempt); returns a word for logs and tests:
    succeeded | failed | canceled | lease_lost | released | requeued."""
    job_id, attempt = claim.job_id, claim.attempt
    from shared.queue import enqueue

    def requeue(word: str) -> str:
        try:
            enqueue(job_id, job_type, settings)
            with session_scope(settings) as s:
                jobstate.mark_enqueued(s, [job_id])
        except Exception as exc:  # the sweeper sends it later
            log.warning("job %s: requeued in the database but not sent (%s); the sweeper will", job_id, exc)
        return word

    try:
        if outcome.kind in ("succeeded", "failed", "canceled"):
            status = JobStatus(outcome.kind)

            def fin():
                with session_scope(settings) as s:
                    jobstate.finish(s, job_id, attempt, status, error=outcome.error,
                                    model_id=outcome.extra.get("model_id"))
            db_retry(settings, f"job {job_id}: final state", fin)
            log.info("job %s: %s", job_id, status.value)
            return status.value
        if outcome.kind in ("released", "lease_lost"):
            # lease_lost: if no other run claimed the job meanwhile (our lease merely ran out while
            # the database was away), give it back now instead of waiting for the sweeper.
            def rel():
                with session_scope(settings) as s:
                    return jobstate.release(s, job_id, attempt, outcome.reason or outcome.kind)
            budget = None if outcome.kind == "released" else 5.0
            try:
                released = db_retry(settings, f"job {job_id}: release", rel, budget)
            except Exception as exc:
                if outcome.kind == "lease_lost":
                    log.warning("job %s: not released (%s); the sweeper will requeue it", job_id, exc)
                    return "lease_lost"
                raise
            if released:
                log.info("job %s attempt %s: released (%s) and requeued", job_id, attempt, outcome.reason)
                return requeue("released")
            log.warning("job %s attempt %s: another run owns the job; nothing written", job_id, attempt)
            return "lease_lost"
        if outcome.kind == "crashed":
            def rof():
                with session_scope(settings) as s:
                    return jobstate.retry_or_fail(s, job_id, attempt, outcome.error or {"code": "crashed"})
            word = db_retry(settings, f"job {job_id}: crashed run", rof)
            if word is None:
                return "lease_lost"
            log.warning("job %s attempt %s: its process died (%s); %s", job_id, attempt,
                        (outcome.error or {}).get("message"), word)
            return requeue("requeued") if word == "requeued" else "failed"
    except LeaseLost:
        log.warning("job %s attempt %s: final state refused (fenced off)", job_id, attempt)
        return "lease_lost"
    raise ValueError(f"unknown outcome {outcome.kind!r}")


def run_work(run: JobRun, work: Callable[[JobRun], dict[str, Any] | None]) -> Outcome:
    try:
        extra = work(run) or {}
    except BaseException as exc:  # noqa: BLE001 - every way out is classified
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return classify(exc, job_id=run.job_id)
    return classify(None, extra)


def run_job(settings: Settings, job_id: str, job_type: str, work: Callable[[JobRun], dict[str, Any] | None]) -> str:
    """Claim ``job_id`` and run ``work`` in this process; returns what happened (for logs and tests)."""
    owner = worker_identity()
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, owner, settings.lease_seconds)
    if claim is None:
        log.info("job %s: not claimable (taken, final or out of attempts); message ignored", job_id)
        return "skipped"
    run = JobRun(settings, claim, job_type, owner)
    run.start()
    log.info("job %s: attempt %s started by %s", job_id, claim.attempt, owner)
    try:
        outcome = run_work(run, work)
    finally:
        run.stop()
    return record_outcome(settings, claim, job_type, outcome)
