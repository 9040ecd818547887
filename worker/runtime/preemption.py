"""Preemption at checkpoints: a long training run gives its worker slot back to work the policy
puts before it, without losing a step.

Off unless ``LDMQ_PREEMPT_AFTER_S`` is set. The question "should this run yield?" is policy, and
lives in ``shared.scheduler.preemption`` (one read-only query); this module asks it and acts:

- **In the worker process, at heartbeat pace.** The executor's supervisor (``worker.runtime.executor``)
  calls :meth:`PreemptionWatch.poll` every 0.2 s; it queries at most once every
  ``heartbeat_seconds`` (a DB query, never per training step), and only for train runs (the only
  ones that checkpoint; a sample job's pieces are short and restart for nothing).
- **Stop at the next checkpoint, not now.** A yes becomes the stop word ``preempt``: the child's
  ``JobRun.check()`` ignores it (the run does not stop at its next step as for SIGTERM), and the
  training loop asks ``TrainHooks.yield_at_checkpoint`` after each periodic checkpoint it writes;
  there it stops (``TrainingStopped``), the train job waits for that checkpoint's upload, and
  ``check(at_checkpoint=True)`` raises ``JobPreempted``. So no step is lost and no extra
  checkpoint is written, and a run yields only at a checkpoint of its own, past the one it
  resumed from: a preempted job has always made progress before it can yield again.
- **Asked again until then.** The answer can change before the checkpoint comes (another worker
  freed up and took the waiting job): each poll re-asks and withdraws the stop word on a no.
  A stronger reason (cancel, shutdown, lost lease, time limit) replaces it.
- **The release path SIGTERM uses.** The run ends as ``released`` (``shared.jobstate.release``:
  running → queued, the attempt refunded, ``sched_key`` kept), with a ``preempted`` event (reason,
  the waiting job, how long it waited) written in the same transaction as its ``requeued``; the
  preempted job's message is re-sent, and a wake-up for the waiting job too (its own message may
  have been spent on a worker that found nothing to take), so a worker takes the waiting job now
  and the preempted one after, resuming from its checkpoint. ``ldmq_worker_preemptions_total``
  counts them by type and reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared import scheduler
from shared.db import session_scope
from shared.models import utcnow
from shared.scheduler import Preemption
from shared.settings import Settings
from worker.runtime import metrics
from worker.runtime.outcome import Outcome

log = logging.getLogger(__name__)

PREEMPTIBLE_TYPES = ("train",)  # job types that stop at checkpoints and resume from them


class PreemptionWatch:
    """One run's preemption, as its supervisor sees it: :meth:`poll` while it runs, :meth:`annotate`
    when it ends, :meth:`after_release` once the outcome is written."""

    def __init__(self, settings: Settings, job_id: str, attempt: int, job_type: str,
                 clock: Callable[[], float] = time.monotonic):
        self.settings, self.job_id, self.attempt, self.job_type = settings, job_id, attempt, job_type
        self.enabled = bool(settings.preempt_after_s) and job_type in PREEMPTIBLE_TYPES
        self._clock = clock
        self.started = clock()
        self.every = float(settings.heartbeat_seconds)
        self._next = self.started + self.every
        self.decision: Preemption | None = None

    def poll(self) -> Preemption | None:
        """The current answer (cached between queries): yield at the next checkpoint for this
        waiting job, or None. A failed query keeps the previous answer (the database blinked)."""
        if not self.enabled:
            return None
        now = self._clock()
        if now < self._next:
            return self.decision
        self._next = now + self.every
        try:
            with session_scope(self.settings) as s:
                decision = scheduler.preemption(s, self.settings, self.job_id, self.attempt, self.job_type,
                                                now - self.started, utcnow())
        except Exception as exc:  # noqa: BLE001 - advice only: the run goes on
            log.warning("job %s: preemption check failed: %s", self.job_id, exc)
            return self.decision
        if decision is not None and self.decision is None:
            log.info("job %s: will yield at its next checkpoint to job %s (%s, waited %.0f s)", self.job_id,
                     decision.waiting_job_id, decision.reason, decision.waited_s)
        elif decision is None and self.decision is not None:
            log.info("job %s: no longer yields (job %s was taken or outranked)", self.job_id,
                     self.decision.waiting_job_id)
        self.decision = decision
        return decision

    def annotate(self, outcome: Outcome) -> Outcome:
        """The run's outcome, with what it yielded to when it stopped for a preemption (its
        ``preempted`` event is written with the release)."""
        if outcome.kind == "released" and outcome.reason == "preempted" and self.decision is not None:
            outcome.extra = {**outcome.extra, "preempted": self.decision.as_event()}
        return outcome

    def after_release(self, outcome: Outcome, result: str) -> None:
        """Once the release is written: count it, and wake a worker for the waiting job."""
        info = outcome.extra.get("preempted")
        if result != "released" or not info:
            return
        metrics.preempted(self.job_type, info["reason"])
        from shared.queue import enqueue

        try:
            enqueue(info["waiting_job"], self.job_type, self.settings)
        except Exception as exc:  # noqa: BLE001 - the sweeper re-sends what the broker lacks
            log.warning("job %s: could not wake a worker for job %s (%s)", self.job_id, info["waiting_job"], exc)
