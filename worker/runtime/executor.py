"""GPU work runs in a spawned executor process; the worker process supervises it.

Design (one job at a time per worker process):

- The Celery task (in the worker process, which never imports torch) *claims* the best ready
  job of its queue's type in the database (``shared.scheduler``: the message is only a wake-up), heartbeats its lease (``worker.runtime.run.JobRun``) and hands the job to the executor: a
  long-lived child started with ``multiprocessing.get_context("spawn")`` (so CUDA never meets
  ``fork``). The child keeps the pipeline cache warm across jobs; it re-reads the job by id,
  runs ``worker.jobs.sample.run_sample`` / ``worker.jobs.train.run_train`` and writes progress,
  outputs and checkpoints itself, every write fenced by the attempt.
- The parent tells the child to stop through a shared word (job sequence number + reason):
  cancel, lease lost, worker shutdown (SIGTERM), soft time limit. The child's ``check()`` between
  denoising / training steps sees it within a step. One reason waits for a checkpoint: a
  preemption (``worker.runtime.preemption``, asked at heartbeat pace), which the training loop
  honours after its next periodic checkpoint; it is not killed after the grace.
- If the child does not stop within ``stop_grace_s`` (the hard time limit is the soft limit plus
  that), the parent SIGKILLs it, which frees its GPU memory, records the outcome, and starts a
  fresh child for the next job. A child that dies by itself (segfault, OOM kill) spends the
  attempt: the job is requeued, or failed once its attempts are used up (a poison job).
- The parent writes the final state (``worker.runtime.outcome.record_outcome``), so a dead child never
  leaves a job without one.

With ``--concurrency N`` Celery runs a thread pool (the tasks only supervise; the work is in the
executors) and the worker keeps N executor children (``ExecutorPool``), one per job running.
The executor has a child of its own for sample outputs (``worker.runtime.outputs``: PNGs, uploads and
their records, off the model's GIL); it exits when the executor does, however that dies.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time

from shared.logctx import job_context
from shared.settings import Settings
from worker.runtime import metrics
from worker.runtime.child import start_child, tune_engine
from worker.runtime.outcome import Outcome, record_outcome
from worker.runtime.outputs import close_writer_process
from worker.runtime.preemption import PreemptionWatch
from worker.runtime.run import STOP_REASONS, JobRun, claim_next_run, run_work, time_limit_s
from worker.runtime.shutdown import shutdown_requested

log = logging.getLogger(__name__)

_REASON_CODE = {r: i + 1 for i, r in enumerate(STOP_REASONS)}
_CODE_REASON = {v: k for k, v in _REASON_CODE.items()}

# ================================================================================================
# The child
# ================================================================================================

def _child_main(conn, stop_word, settings_json: str, parent_pid: int) -> None:
    """Entry point of the spawned executor process."""
    from shared.jobstate import Claim

    start_child("executor", parent_pid)
    clog = logging.getLogger("worker.runtime.executor.child")
    state = {"shutdown": False}

    def on_term(_sig, _frame):
        state["shutdown"] = True  # stop between steps, checkpoint, give the job back

    signal.signal(signal.SIGTERM, on_term)

    settings = Settings.model_validate_json(settings_json)
    tune_engine(settings)
    # Import the heavy parts now, so that the first job does not wait for them.
    from worker.jobs.sample import run_sample
    from worker.jobs.train import run_train

    _preload(clog)

    works = {"sample": run_sample, "train": run_train}
    conn.send(("ready", os.getpid()))
    clog.info("executor ready")
    while not state["shutdown"]:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        seq, job_id, job_type, attempt, owner, tenant_id = msg
        conn.send(("started", seq))

        def external_stop(seq=seq) -> str | None:
            word = stop_word.value
            if word >> 8 == seq and word & 0xFF:
                return _CODE_REASON.get(word & 0xFF)
            return "shutdown" if state["shutdown"] else None

        claim = Claim(job_id, attempt, None, tenant_id)  # type: ignore[arg-type]
        run = JobRun(settings, claim, job_type, owner, heartbeat=False, external_stop=external_stop)
        with job_context(job_id, tenant_id):
            outcome = run_work(run, lambda r, work=works[job_type]: work(settings, r))
            clog.info("job %s attempt %s: %s %s", job_id, attempt, outcome.kind, outcome.error or outcome.reason or "")
        try:
            conn.send(("result", seq, outcome.to_dict()))
        except (EOFError, OSError):
            break
    close_writer_process()  # lets it finish what it was given rather than be terminated at exit
    conn.close()


def _preload(clog) -> None:
    try:
        import diffusers
        import torch  # noqa: F401
        import transformers

        for lib in (diffusers, transformers):
            # Their records go through the root logger (one format, the job context), not their
            # own stderr handlers; progress bars off.
            lib.utils.logging.disable_default_handler()
            lib.utils.logging.enable_propagation()
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
        from diffusers import StableDiffusionPipeline  # noqa: F401
        from transformers import BertModel, CLIPTextModel  # noqa: F401
    except Exception as exc:  # the job will report it
        clog.warning("executor: preloading failed: %s", exc)


# ================================================================================================
# The parent
# ================================================================================================

class ExecutorDied(Exception):
    pass


class Executor:
    """The spawned child of one worker process, restarted when it dies or is killed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.stop_word = self.ctx.Value("q", 0, lock=False)
        self.proc = None
        self.conn = None
        self.seq = 0
        self.ready = False
        self.early_deaths = 0  # consecutive deaths before a job began
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def start(self) -> None:
        with self._lock:
            if self.alive():
                return
            self._reap()
            parent_conn, child_conn = self.ctx.Pipe(duplex=True)
            proc = self.ctx.Process(target=_child_main, name="ldmq-executor", daemon=False,
                                    args=(child_conn, self.stop_word, self.settings.model_dump_json(), os.getpid()))
            proc.start()
            child_conn.close()
            self.proc, self.conn, self.ready = proc, parent_conn, False
            log.info("executor: started process %s", proc.pid)

    def _reap(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        if self.proc is not None:
            self.proc.join(timeout=5)
            if not self.proc.is_alive():
                metrics.process_exited(self.proc.pid)  # its live gauges (GPU memory) go
        self.proc, self.conn = None, None

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            log.warning("executor: killing process %s", self.proc.pid)
            self.proc.kill()
            self.proc.join(timeout=10)
        self._reap()

    def close(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except (OSError, EOFError, AttributeError):
            pass
        self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            self.kill()
        self._reap()

    # -- one job --------------------------------------------------------------------------------
    def _recv(self, timeout: float) -> tuple | None:
        """The next message from the child, or None; raises ExecutorDied when it is gone."""
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise ExecutorDied(str(exc)) from exc
        if not self.proc.is_alive():
            raise ExecutorDied(f"exit code {self.proc.exitcode}")
        return None

    def tell_stop(self, seq: int, reason: str | None) -> None:
        """Set the child's stop word for job ``seq`` (None: no reason any more, a withdrawn preemption)."""
        self.stop_word.value = (seq << 8) | (_REASON_CODE[reason] if reason else 0)

    def run(self, run: JobRun, preemption: PreemptionWatch | None = None) -> Outcome:
        """Run the claimed job in the child, supervising it (and asking ``preemption`` whether it
        should yield at its next checkpoint); returns how it ended."""
        self.start()
        self.seq += 1
        self.stop_word.value = 0
        try:
            self.conn.send((self.seq, run.job_id, run.job_type, run.attempt, run.owner, run.claim.tenant_id))
        except (OSError, EOFError):
            self.kill()
            return Outcome("released", reason="executor unavailable")
        watch = _Watch(self, run, self.seq, preemption)
        while True:
            try:
                msg = self._recv(0.2)
            except ExecutorDied as exc:
                code = None
                if self.proc is not None:
                    self.proc.join(timeout=5)
                    code = self.proc.exitcode
                self._reap()
                return watch.died(exc, code)
            outcome = watch.message(msg) if msg is not None else watch.tick(time.monotonic())
            if outcome is not None:
                return outcome


class _Watch:
    """One job's supervision by :meth:`Executor.run`: the child's messages, the reasons to stop
    (the run's own, worker shutdown, the soft time limit), the grace before a kill, and what each
    way of ending means for the job."""

    def __init__(self, executor: Executor, run: JobRun, seq: int, preemption: PreemptionWatch | None = None):
        self.executor, self.run, self.seq = executor, run, seq
        self.grace = executor.settings.stop_grace_s
        self.limit = time_limit_s(executor.settings, run.job_type)
        self.started = False
        self.soft = self.hard = None  # deadlines, from the moment the child starts the job
        self.stop_reason: str | None = None
        self.stop_sent = 0.0
        self.preemption = preemption

    def message(self, msg: tuple) -> Outcome | None:
        if msg[0] == "ready":
            self.executor.ready = True
        elif msg[0] == "started" and msg[1] == self.seq:
            self.started = True
            self.executor.early_deaths = 0
            self.soft = time.monotonic() + self.limit
            self.hard = self.soft + self.grace
        elif msg[0] == "result" and msg[1] == self.seq:
            outcome = Outcome.from_dict(msg[2])
            return self.preemption.annotate(outcome) if self.preemption is not None else outcome
        return None

    def tick(self, now: float) -> Outcome | None:
        """No message: ask the child to stop when there is a reason; kill it past the grace."""
        reason = self.run.stop_reason()
        if reason is None and shutdown_requested():
            reason = "shutdown"
        if reason is None and self.soft is not None and now > self.soft:
            reason = "timeout"
        if reason is None and self.started and self.stop_reason in (None, "preempt") and self.preemption is not None:
            # At the next checkpoint, not at once; withdrawn if the answer turns to no before then.
            if self.preemption.poll() is not None:
                reason = "preempt"
            elif self.stop_reason == "preempt":
                self.executor.tell_stop(self.seq, None)
                self.stop_reason = None
        if reason is not None and self.stop_reason in (None, "preempt") and reason != self.stop_reason:
            log.info("job %s: asking the executor to stop (%s)", self.run.job_id,
                     "at its next checkpoint: preempted" if reason == "preempt" else reason)
            self.executor.tell_stop(self.seq, reason)
            self.stop_reason, self.stop_sent = reason, now
        if self.hard is not None and now > self.hard:
            self.executor.kill()
            return Outcome("failed", {"code": "timeout", "message": (
                f"the job ran past its hard time limit of {self.limit + self.grace:g} s and its process was killed")})
        if self.stop_reason not in (None, "timeout", "preempt") and now - self.stop_sent > self.grace:
            log.warning("job %s: the executor did not stop within %g s (%s); killing it", self.run.job_id, self.grace,
                        self.stop_reason)
            self.executor.kill()
            if self.stop_reason == "cancel":
                return Outcome("canceled")
            if self.stop_reason == "shutdown":
                return Outcome("released", reason="worker shutdown (executor killed)")
            return Outcome("lease_lost", reason="executor killed after losing its lease")
        return None

    def died(self, exc: ExecutorDied, code: int | None) -> Outcome:
        """The child is gone: what that means depends on whether the job began and why it was stopping."""
        if not self.started and (self.stop_reason == "shutdown" or shutdown_requested()):
            return Outcome("released", reason="worker shutdown (before the job began)")
        if not self.started:
            # Not the job's doing: the child died before it began (a broken install, an OOM kill
            # while importing). Back off, so that a broken worker does not spin.
            self.executor.early_deaths += 1
            pause = min(30.0, 2.0 ** self.executor.early_deaths)
            log.error("executor: died before starting job %s (%s); giving the job back in %.0f s",
                      self.run.job_id, _exit_text(code), pause)
            time.sleep(pause)
            return Outcome("released", reason=f"executor exited before the job began ({_exit_text(code)})")
        if self.stop_reason == "shutdown":
            return Outcome("released", reason=f"worker shutdown (executor exited: {exc})")
        if self.stop_reason == "cancel":
            return Outcome("canceled")
        if self.stop_reason == "lease_lost":
            return Outcome("lease_lost", reason="executor exited after losing its lease")
        return Outcome("crashed", {"code": "executor_died",
                                   "message": f"the job's executor process died ({_exit_text(code)})"})


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ExecutorPool:
    """The worker's executors, one per job it runs at once (``ldmq worker --concurrency N``: Celery's
    thread pool, whose task threads only supervise): a task takes an idle executor, starting one if
    none is idle, and gives it back warm for the next job."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._idle: list[Executor] = []
        self._all: list[Executor] = []
        self._lock = threading.Lock()

    def acquire(self) -> Executor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            executor = Executor(self.settings)
            self._all.append(executor)
            return executor

    def release(self, executor: Executor) -> None:
        with self._lock:
            self._idle.append(executor)

    def prewarm(self, n: int) -> None:
        """Start ``n`` executors now (torch imports take seconds), so the first jobs do not wait."""
        taken = [self.acquire() for _ in range(n)]
        for executor in taken:
            executor.start()
            self.release(executor)

    def executors(self) -> list[Executor]:
        with self._lock:
            return list(self._all)

    def close(self) -> None:
        for executor in self.executors():
            executor.close()


_POOL: ExecutorPool | None = None
_POOL_LOCK = threading.Lock()


def get_executors(settings: Settings) -> ExecutorPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.settings != settings:
            if _POOL is not None:
                _POOL.close()
            _POOL = ExecutorPool(settings)
        return _POOL


def close_executors() -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


def execute_job(settings: Settings, woken_by: str, job_type: str) -> str:
    """The body of the Celery tasks: claim the best ready job of the queue's type (whatever job the
    message named: ``woken_by`` is only logged), supervise the executor, record the outcome."""
    tune_engine(settings)
    # The lease and cancel are watched here; the time limits are timed by Executor.run from the
    # moment the child starts the job (not while it warms up).
    run = claim_next_run(settings, job_type, enforce_time_limit=False)
    if run is None:
        log.info("job %s: not claimable, and no other %s job is ready (taken, final, out of attempts, or its "
                 "tenant at max_running); message ignored", woken_by, job_type)
        return "skipped"
    claim = run.claim
    job_id = claim.job_id
    with job_context(job_id, claim.tenant_id):
        log.info("job %s: attempt %s claimed by %s (woken by the message for job %s)", job_id, claim.attempt,
                 run.owner, woken_by)
        run.start()
        pool = get_executors(settings)
        executor = pool.acquire()
        clock = time.perf_counter()
        metrics.BUSY.inc()
        preemption = PreemptionWatch(settings, job_id, claim.attempt, job_type)
        try:
            outcome = executor.run(run, preemption)
        finally:
            run.stop()
            metrics.BUSY.dec()
            pool.release(executor)
        result = record_outcome(settings, claim, job_type, outcome)
        preemption.after_release(outcome, result)
        metrics.job_finished(job_type, result, time.perf_counter() - clock)
        log.info("job %s attempt %s: %s", job_id, claim.attempt, result)
    if not shutdown_requested() and not executor.alive():
        executor.start()  # warm a fresh child for the next job (idempotent if another took it)
    return result
