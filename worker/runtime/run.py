"""The life of one job run: claim in the database, heartbeat the lease, do the work, record the
final state. The Celery message only wakes us up; everything that counts is fenced by the
attempt number the claim returned (see ``shared.jobstate``).

Two ways to run the work share this module:

- :func:`run_job` runs it in the calling process (tests, tools);
- ``worker.runtime.executor.execute_job`` (what the Celery tasks call) claims and heartbeats here,
  in the worker process, and runs the work in a spawned executor process (see that module).

Either way the work gets a :class:`JobRun` (the ``worker.jobs.base.Run`` a job is written
against): cooperative checks between steps (``check()``), fenced writes, metrics, and for sample
runs the claim of companion jobs. :func:`claim_next_run` (the best ready job by policy, what a
woken worker does) and :func:`claim_run` (one named job: a companion, tools, tests) are the ways a
run is claimed and built.
"""

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
from shared.settings import Settings
from worker.runtime import metrics
from worker.runtime.errors import JobCanceled, JobInterrupted, JobPreempted, JobTimeout
from worker.runtime.outcome import Outcome, classify, record_outcome

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def time_limit_s(settings: Settings, job_type: str) -> float:
    return float(settings.train_time_limit_s if job_type == "train" else settings.sample_time_limit_s)


# Why a run must stop, as the executor tells its child (see worker.runtime.executor). "preempt" is
# the odd one: stop at the next checkpoint, not at the next step (worker.runtime.preemption).
STOP_REASONS = ("cancel", "lease_lost", "shutdown", "timeout", "preempt")


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
        # A supervisor that times the run itself (worker.runtime.executor) turns this clock off.
        self.deadline = time.monotonic() + self.time_limit_s if enforce_time_limit else float("inf")
        self._external_stop = external_stop
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat = heartbeat
        self.last_renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._progress_events = jobstate.ProgressEvents(settings.progress_event_min_s)

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
                        cancel = jobstate.heartbeat(s, self.job_id, self.attempt, self.settings.lease_seconds,
                                                    settings=self.settings)
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
        """Why this run must stop, or None: one of ``STOP_REASONS`` ("preempt" only when no reason
        to stop at once holds)."""
        if self._lost.is_set():
            return "lease_lost"
        if self._cancel.is_set():
            return "cancel"
        external = self._external_stop() if self._external_stop is not None else None
        if external and external != "preempt":
            return external
        if time.monotonic() > self.deadline:
            return "timeout"
        return external or None

    def yield_requested(self) -> bool:
        """Asked to give the job back at the next checkpoint (a preemption), and nothing stronger."""
        return self.stop_reason() == "preempt"

    def check(self, *, at_checkpoint: bool = False) -> None:
        """Raise if this run must stop: lease lost, cancel requested, shutdown, or time limit passed;
        ``at_checkpoint`` (the run just stored a checkpoint): also when asked to yield there."""
        reason = self.stop_reason()
        if reason is None:
            return
        if reason == "lease_lost":
            raise LeaseLost(self.job_id)
        if reason == "cancel":
            raise JobCanceled(self.job_id)
        if reason == "shutdown":
            raise JobInterrupted(self.job_id)
        if reason == "preempt":
            if at_checkpoint:
                raise JobPreempted(self.job_id)
            return
        raise JobTimeout(f"the job ran past its time limit of {self.time_limit_s:g} s")

    def poll_cancel(self) -> None:
        """Ask the database now (not only at the next heartbeat) whether to stop."""
        with session_scope(self.settings) as s:
            if jobstate.cancel_requested(s, self.job_id, self.attempt):
                self._cancel.set()
        self.check()

    # -- fenced writes ----------------------------------------------------------------------------
    def progress(self, fraction: float, detail: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """The job row always; a ``progress`` event at a bounded rate (see ``jobstate.ProgressEvents``)."""
        event = self._progress_events.due(self.job_id, force=force or fraction >= 1.0)
        with session_scope(self.settings) as s:
            jobstate.set_progress(s, self.job_id, self.attempt, fraction, detail, event=event)

    def set_checkpoint(self, key: str, info: dict[str, Any] | None = None) -> None:
        with session_scope(self.settings) as s:
            jobstate.set_checkpoint(s, self.job_id, self.attempt, key, info)

    # -- metrics ----------------------------------------------------------------------------------
    def observe_step(self, seconds: float) -> None:
        metrics.observe_step(self.job_type, seconds)

    def images_made(self, count: int, seconds: float) -> None:
        metrics.images_made(count, seconds)

    def device_memory(self, device: str) -> None:
        metrics.sample_gpu_memory(device)

    def record_timing(self, **figure) -> None:
        """Fold a measured figure into ``step_timings`` (``shared.estimates.record``). A failure is
        logged, never raised: the job's work is done and worth more than its timing."""
        from shared import estimates

        try:
            with session_scope(self.settings) as s:
                estimates.record(s, **figure)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("job %s: could not record its step timing %s: %s", self.job_id, figure.get("kind"), exc)

    # -- sample runs: outputs and companion jobs ----------------------------------------------------
    def output_writer(self):
        from worker.runtime.outputs import OutputWriter

        return OutputWriter(self.settings)

    def claim_companion(self, job_id: str) -> JobRun | None:
        """Claim ``job_id`` (its own claim, fencing token and heartbeat) to run inside this run."""
        run = claim_run(self.settings, job_id, self.job_type, owner=self.owner)
        if run is not None:
            run.start()
        return run

    def end(self, outcome: Outcome) -> str:
        """Record how this run ended and stop its heartbeat (a companion's end; the lead run's is
        recorded by whoever claimed it)."""
        try:
            return record_outcome(self.settings, self.claim, self.job_type, outcome)
        finally:
            self.stop()

    def succeed(self, extra: dict[str, Any] | None = None) -> str:
        return self.end(Outcome("succeeded", extra=extra or {}))

    def end_by(self, exc: BaseException) -> str:
        return self.end(classify(exc, job_id=self.job_id))

    def release(self, reason: str) -> str:
        return self.end(Outcome("released", reason=reason))


def claim_run(settings: Settings, job_id: str, job_type: str, *, owner: str | None = None, **kwargs) -> JobRun | None:
    """Claim ``job_id`` in the database (one conditional UPDATE: attempt + 1, a fresh lease) and
    build its :class:`JobRun` (not started); None when it is not claimable (taken, final, out of
    attempts). ``kwargs`` go to :class:`JobRun`."""
    owner = owner or worker_identity()
    try:
        with session_scope(settings) as s:
            claim = jobstate.claim(s, job_id, owner, settings.lease_seconds)
    except jobstate.TenantAtCap:  # another worker's claim filled the tenant's slots; rolled back
        return None
    if claim is None:
        return None
    return JobRun(settings, claim, job_type, owner, **kwargs)


# Claims in a row that may each lose a race for a tenant's last slot (``jobstate.TenantAtCap``).
# Each loss is to a claim that committed, and the retry skips that tenant, so only a race for
# another capped tenant's slot can make it lose again; after these, the worker takes nothing
# this time and the next wake-up (the sweeper's, at worst) tries again.
CAP_RETRIES = 4


def claim_next_run(settings: Settings, job_type: str, *, owner: str | None = None, **kwargs) -> JobRun | None:
    """Claim the best ready job of ``job_type`` by the scheduling policy (``shared.scheduler``), in
    one conditional UPDATE, and build its :class:`JobRun` (not started); None when nothing is
    claimable. Observes the job's queue wait (first claims) by tenant and priority."""
    owner = owner or worker_identity()
    claim = None
    for _ in range(CAP_RETRIES):
        try:
            with session_scope(settings) as s:
                claim = jobstate.claim_next(s, settings, job_type, owner, settings.lease_seconds)
            break
        except jobstate.TenantAtCap:  # rolled back; the next statement sees that tenant at its cap
            continue
    if claim is None:
        return None
    if claim.waited_s is not None:
        metrics.queue_waited(job_type, claim.tenant_id or "", claim.priority, claim.waited_s)
    return JobRun(settings, claim, job_type, owner, **kwargs)


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
    run = claim_run(settings, job_id, job_type)
    if run is None:
        log.info("job %s: not claimable (taken, final or out of attempts); message ignored", job_id)
        return "skipped"
    run.start()
    log.info("job %s: attempt %s started by %s", job_id, run.attempt, run.owner)
    try:
        outcome = run_work(run, work)
    finally:
        run.stop()
    return record_outcome(settings, run.claim, job_type, outcome)
