"""What a job needs from whoever runs it, and the one error a job raises of its own.

The jobs package sits below the runtime (``worker.runtime``: leases, executor, output writer,
metrics) in the one-way import order ``tasks → runtime → jobs → model``, so a job never imports
the runtime: it is handed a :class:`Run` (``worker.runtime.run.JobRun`` implements it) and talks
to the runtime only through it.
"""

from __future__ import annotations

from typing import Any, Protocol


class JobError(Exception):
    """A failure that is the job's own (bad data, missing model): final, with a clear message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class HelperDied(Exception):
    """A process the job started besides its own (a training rank) failed or died: as when the
    executor dies, the attempt is spent and the job requeued while it has attempts left (a rank
    lost to an OOM kill or a device fault may well train on the next try). ``code`` and the
    message are the tenant's to read: no paths, no traceback."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class OutputSink(Protocol):
    """Where a sample job's images go (``worker.runtime.outputs.OutputWriter``)."""

    def submit(self, *, job_id: str, attempt: int, tenant_id: str, lead: bool, made: int, total: int,
               meta: list[tuple[int, int, int]], arrays, text: list[dict[str, str]] | None = None) -> None:
        """``text``: each image's PNG text chunks (keyword → text)."""

    def drain(self) -> None: ...

    def close(self) -> None: ...


class Run(Protocol):
    """A claimed job's handle: cooperative stop checks, fenced writes, metrics, and (for sample
    runs that pack other jobs into their batches) claiming and ending companion jobs."""

    job_id: str
    attempt: int
    job_type: str

    def check(self, *, at_checkpoint: bool = False) -> None:
        """Raise if the run must stop now (canceled, lease lost, shutdown, time limit); with
        ``at_checkpoint`` (a checkpoint was just stored) also when asked to yield there."""

    def yield_requested(self) -> bool:
        """Asked to give the job back at its next checkpoint (a preemption: the work it yields to
        has waited); a job that checkpoints stops there, then calls ``check(at_checkpoint=True)``."""

    def progress(self, fraction: float, detail: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """The job's progress; an event at a bounded rate, always with ``force`` or at 1.0."""

    def set_checkpoint(self, key: str, info: dict[str, Any] | None = None) -> None:
        """Move the job's checkpoint pointer; ``info`` (step, metrics) goes into its event."""

    # -- metrics
    def observe_step(self, seconds: float) -> None: ...

    def images_made(self, count: int, seconds: float) -> None: ...

    def device_memory(self, device: str) -> None: ...

    def record_timing(self, *, kind: str, model_key: str, size: str, batch: int, guidance: bool, device: str,
                      seconds: float, units: int) -> None:
        """Keep a measured figure (seconds per unit of ``kind``, over ``units``) for estimates
        (``shared.estimates``); never raises: a figure is not worth a job."""

    # -- sample runs
    def output_writer(self) -> OutputSink: ...

    def claim_companion(self, job_id: str) -> Run | None:
        """Claim another queued job to run inside this one (its own lease and fencing token)."""

    def succeed(self, extra: dict[str, Any] | None = None) -> str: ...

    def end_by(self, exc: BaseException) -> str:
        """Record how a companion ended, from the exception that stopped it."""

    def release(self, reason: str) -> str: ...

    def stop(self) -> None:
        """Stop this run's heartbeat (idempotent)."""
