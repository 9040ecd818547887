"""How a run ended (:class:`Outcome`), how an exception maps to one (:func:`classify`), and writing
it down fenced by the run's attempt (:func:`record_outcome`)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import jobstate
from shared.db import session_scope
from shared.jobstate import Claim, LeaseLost
from shared.models import JobStatus
from shared.settings import Settings
from worker.runtime.errors import error_kind, is_transient_db_error

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """``kind``: succeeded | failed | canceled (final states); lease_lost (another run owns the
    job: write nothing); released (give the job back now, the attempt refunded: shutdown, a
    preemption at a checkpoint, or the database went away); crashed (the run's process died: spend the attempt, requeue or fail)."""

    kind: str
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "error": self.error, "extra": self.extra, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        return cls(d["kind"], d.get("error"), d.get("extra") or {}, d.get("reason", ""))


def classify(exc: BaseException | None, extra: dict[str, Any] | None = None, job_id: str = "") -> Outcome:
    """Map how the work ended (its exception, or None for success) to an Outcome."""
    if exc is None:
        return Outcome("succeeded", extra=extra or {})
    kind = error_kind(exc)
    if kind == "lease_lost":
        return Outcome("lease_lost", reason="another run owns the job")
    if kind == "canceled":
        return Outcome("canceled")
    if kind == "interrupted":
        return Outcome("released", reason="worker shutdown")
    if kind == "preempted":
        return Outcome("released", reason="preempted")
    if kind == "timeout":
        return Outcome("failed", {"code": "timeout", "message": str(exc)})
    if kind == "process_died":
        return Outcome("crashed", {"code": getattr(exc, "code", "writer_died"), "message": str(exc)})
    if kind == "job_error":
        return Outcome("failed", {"code": exc.code, "message": str(exc)})
    # A job's error is read by its tenant: a code and a safe message. Keys, local paths and
    # exception text stay in the worker's log, under a reference the message gives.
    if kind in ("storage_unavailable", "storage_error"):
        ref = _reference()
        log.warning("job %s: %s [ref %s]: %s", job_id, kind, ref, exc)
        return Outcome("failed", {"code": kind, "message": f"{exc.public} (reference {ref})"})
    if kind == "db_unreachable":
        return Outcome("released", reason="database unreachable")
    ref = _reference()
    log.error("job %s failed [ref %s]", job_id, ref, exc_info=exc)
    return Outcome("failed", {"code": "internal_error", "message": f"internal error in the worker (reference {ref}; "
                                                                   "the worker's log has the details)"})


def _reference() -> str:
    return uuid.uuid4().hex[:12]


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


def _wake_held_back(settings: Settings, claim: Claim) -> None:
    """A run of a tenant with ``max_running`` ended: wake a worker for its next queued job."""
    from shared.queue import enqueue

    if not claim.tenant_id:
        return
    try:
        with session_scope(settings) as s:
            nxt = jobstate.held_back(s, claim.tenant_id)
        if nxt is not None:
            enqueue(nxt[0], nxt[1], settings)
    except Exception as exc:  # the sweeper sends it later
        log.warning("job %s: could not wake a worker for its tenant's next job (%s)", claim.job_id, exc)


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
                                    model_id=outcome.extra.get("model_id"), settings=settings)
            db_retry(settings, f"job {job_id}: final state", fin)
            log.info("job %s: %s", job_id, status.value)
            _wake_held_back(settings, claim)
            return status.value
        if outcome.kind in ("released", "lease_lost"):
            # lease_lost: if no other run claimed the job meanwhile (our lease merely ran out while
            # the database was away), give it back now instead of waiting for the sweeper.
            def rel():
                with session_scope(settings) as s:
                    return jobstate.release(s, job_id, attempt, outcome.reason or outcome.kind, settings=settings,
                                            preempted=outcome.extra.get("preempted"))
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
                    return jobstate.retry_or_fail(s, job_id, attempt, outcome.error or {"code": "crashed"},
                                                  settings=settings)
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
