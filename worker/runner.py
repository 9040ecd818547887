"""The life of one job run: claim in the database, heartbeat the lease, do the work, record the
final state. The Celery message only wakes us up; everything that counts is fenced by the
attempt number the claim returned (see ``shared.jobstate``)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from shared import jobstate
from shared.db import session_scope
from shared.jobstate import Claim, LeaseLost
from shared.models import JobStatus
from shared.settings import Settings
from shared.storage import StorageError

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """The user asked to cancel; raised between denoising or training steps."""


class JobTimeout(Exception):
    pass


class JobError(Exception):
    """A failure that is the job's own (bad data, missing model): final, with a clear message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class JobRun:
    """Handle given to the work function: cooperative checks, fenced progress and writes."""

    def __init__(self, settings: Settings, claim: Claim, job_type: str, owner: str):
        self.settings = settings
        self.claim = claim
        self.job_id = claim.job_id
        self.attempt = claim.attempt
        self.owner = owner
        limit = settings.train_time_limit_s if job_type == "train" else settings.sample_time_limit_s
        self.deadline = time.monotonic() + limit
        self.time_limit_s = limit
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)

    # -- heartbeat --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings) as s:
                    if jobstate.heartbeat(s, self.job_id, self.attempt, self.settings.lease_seconds):
                        self._cancel.set()
            except LeaseLost:
                log.warning("job %s attempt %s: lease lost; stopping", self.job_id, self.attempt)
                self._lost.set()
                return
            except Exception:
                # A database blip: keep trying until the lease would have run out.
                log.exception("job %s: heartbeat failed", self.job_id)

    # -- checks between steps -----------------------------------------------------------------
    def check(self) -> None:
        """Raise if this run must stop: lease lost, cancel requested, or time limit passed."""
        if self._lost.is_set():
            raise LeaseLost(self.job_id)
        if self._cancel.is_set():
            raise JobCanceled(self.job_id)
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"the job ran past its time limit of {self.time_limit_s} s")

    def poll_cancel(self) -> None:
        """Ask the database now (not only at the next heartbeat) whether to stop."""
        with session_scope(self.settings) as s:
            if jobstate.heartbeat(s, self.job_id, self.attempt, self.settings.lease_seconds):
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


def run_job(settings: Settings, job_id: str, job_type: str, work: Callable[[JobRun], dict[str, Any] | None]) -> str:
    """Claim ``job_id`` and run ``work``; returns what happened (for logs and tests)."""
    owner = worker_identity()
    with session_scope(settings) as s:
        claim = jobstate.claim(s, job_id, owner, settings.lease_seconds)
    if claim is None:
        log.info("job %s: not claimable (taken, final or out of attempts); message ignored", job_id)
        return "skipped"
    run = JobRun(settings, claim, job_type, owner)
    run.start()
    log.info("job %s: attempt %s started by %s", job_id, claim.attempt, owner)
    status, error, extra = JobStatus.succeeded, None, {}
    try:
        extra = work(run) or {}
    except LeaseLost:
        log.warning("job %s attempt %s: another run owns the job; stopping without writing", job_id, claim.attempt)
        return "lease_lost"
    except JobCanceled:
        status = JobStatus.canceled
    except JobTimeout as exc:
        status, error = JobStatus.failed, {"code": "timeout", "message": str(exc)}
    except JobError as exc:
        status, error = JobStatus.failed, {"code": exc.code, "message": str(exc)}
    except StorageError as exc:
        status, error = JobStatus.failed, {"code": "storage_error", "message": f"object storage failed: {exc}"}
    except Exception as exc:
        log.exception("job %s failed", job_id)
        status, error = JobStatus.failed, {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
    finally:
        run.stop()
    try:
        with session_scope(settings) as s:
            jobstate.finish(s, job_id, claim.attempt, status, error=error, model_id=extra.get("model_id"))
    except LeaseLost:
        log.warning("job %s attempt %s: final state refused (fenced off)", job_id, claim.attempt)
        return "lease_lost"
    log.info("job %s: %s", job_id, status.value)
    return status.value
