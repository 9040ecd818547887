"""Train jobs: glue between the job's run (leases, progress), storage and ``worker.model.training``.

Checkpoints go to storage under the job's prefix, one folder per step; the pointer to the latest
lives in the database (``jobs.checkpoint_key``), and only the last K are kept. A job that is
restarted downloads its latest checkpoint and resumes from it. At the end the pipeline is
registered as a model, with its evaluation (metrics, loss curve, sample grid) beside it; a LoRA
job's model is its adapter alone, whose config names the base model (``shared.adapters``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from shared import estimates
from shared.adapters import base_of, lora_config
from shared.db import session_scope
from shared.jobstate import LeaseLost
from shared.models import Dataset, Job, Model
from shared.pipelines import PipelineRejected
from shared import sampling_defaults
from shared.registry import register_adapter_dir, register_pipeline_dir
from shared.settings import Settings
from shared.storage import checkpoint_prefix, get_storage, job_prefix
from shared.train_schema import TrainParams
from worker.jobs.base import HelperDied, JobError, Run
from worker.model.pipelines import device_kind, resolve_device

log = logging.getLogger(__name__)


def run_train(settings: Settings, run: Run) -> dict:
    """Fetch the job's inputs, train (resuming from the job's checkpoint, if any), register the model."""
    import torch

    from worker.model.distributed import RankFailed
    from worker.model.training import TrainingStopped, train

    if settings.worker_threads:
        torch.set_num_threads(settings.worker_threads)
    storage = get_storage(settings)
    with session_scope(settings) as s:
        job = s.get(Job, run.job_id)
        params = TrainParams.model_validate(job.params)
        dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        base = s.get(Model, params.base_model) if params.base_model else None
        tenant_id, checkpoint_key = job.tenant_id, job.checkpoint_key
    if params.base_model and base is None:
        raise JobError("model_not_found", f"base model {params.base_model!r} no longer exists")
    if base is not None and base_of(base.config):  # the API refuses it; a job stored before is failed here
        raise JobError("invalid_base_model", f"base model {base.id!r} is a LoRA adapter of {base_of(base.config)!r}; "
                                             "fine-tune a pipeline model")

    workdir = Path(tempfile.mkdtemp(prefix=f"train-{run.job_id}-", dir=_scratch(settings)))
    try:
        data = _load_data(storage, params, dataset, workdir)
        base_dir = storage.download_dir(base.key, workdir / "base") if base is not None else None
        uploader = CheckpointUploader(storage, run, tenant_id, params.keep_checkpoints, workdir / "staging",
                                      saved=[checkpoint_key] if checkpoint_key else [])
        device = resolve_device(settings.worker_device)
        clocks = StageClocks()
        world_size = _world_size(settings, device, params)
        hooks = _hooks(run, storage, uploader, checkpoint_key, workdir, device, clocks)
        try:
            result = train(params, workdir=workdir / "run", dataset=data, base_model_dir=base_dir, hooks=hooks,
                           device=device, world_size=world_size)
        except TrainingStopped:
            uploader.wait()  # the checkpoint of the step it stopped at is stored before the job is given back
            run.check(at_checkpoint=True)  # raises the precise reason (canceled, lease lost, timeout, preempted)
            raise LeaseLost(run.job_id) from None
        except PipelineRejected as exc:  # the base model failed the pipeline check: never loaded
            raise JobError("unsafe_model", f"the base model was refused: {exc}") from None
        except RankFailed as exc:  # another rank's process failed or died: requeue while attempts last
            log.error("job %s: %s", run.job_id, exc)
            raise HelperDied("rank_died", f"training rank {exc.rank} of {world_size} failed ({exc.summary}); "
                                          "the attempt is retried from the last checkpoint") from None
        finally:
            uploader.close()
            clocks.record(run, params, device_kind(device))  # a stopped run's steps were measured too
        uploader.wait()
        run.check()
        return {"model_id": _register(settings, storage, run, tenant_id, params, result)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _world_size(settings: Settings, device: str, params: TrainParams) -> int:
    """The ranks this job trains on (``LDMQ_TRAIN_DEVICES``); a setting this worker cannot honour
    is the operator's error, reported as the job's, with what is wrong."""
    from worker.model.distributed import resolve_world_size

    try:
        return resolve_world_size(settings.train_devices, device, params.batch_size)
    except ValueError as exc:
        raise JobError("worker_misconfigured", f"LDMQ_TRAIN_DEVICES={settings.train_devices}: {exc}") from None


def _load_data(storage, params: TrainParams, dataset: Dataset | None, workdir: Path):
    """The training images: builtin, or the dataset's archive streamed to disk and decoded."""
    from worker.model.data import load_dataset

    archive = None
    if dataset is not None:
        archive = workdir / Path(dataset.key).name
        with open(archive, "wb") as f:  # streamed to disk, never whole in memory
            storage.read_into(dataset.key, f)
    try:
        return load_dataset(params.dataset, archive_path=archive, resolution=params.resolution)
    except ValueError as exc:
        raise JobError("invalid_dataset", str(exc)) from exc


class StageClocks:
    """Seconds of each stage's optimisation steps and evaluations, as the loop reports them, kept
    for estimates (``shared.estimates``) when the run ends."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}  # kind -> [seconds, units]

    def add(self, kind: str, seconds: float) -> None:
        total = self.totals.setdefault(kind, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def record(self, run: Run, params: TrainParams, device: str) -> None:
        keys = estimates.train_keys(params)
        size = estimates.size_key(params.resolution, params.resolution)
        for kind, (seconds, units) in self.totals.items():
            if kind in keys:
                run.record_timing(kind=kind, model_key=keys[kind], size=size, batch=params.batch_size, guidance=False,
                                  device=device, seconds=seconds / units, units=int(units))


def _hooks(run: Run, storage, uploader: CheckpointUploader, checkpoint_key: str | None, workdir: Path, device: str,
           clocks: StageClocks):
    """How the training loop reports to the run: progress (fenced), stop checks (at once; or, for a
    preemption, at the next checkpoint), checkpoints to storage, the checkpoint to resume from, step
    and evaluation timings."""
    from worker.model.training import TrainHooks

    def progress(info: dict) -> None:
        # No run.check() here: should_stop() (next) stops the loop *after* a checkpoint.
        total = max(1, int(info.get("total_steps") or 1))
        stage_end = info.get("stage_step") is not None and info.get("stage_step") == info.get("stage_total_steps")
        run.progress(min(1.0, float(info.get("step", 0)) / total), info, force=stage_end)
        run.device_memory(device)

    def should_stop() -> bool:
        try:
            run.check()
        except Exception:
            return True
        return False

    def step_done(stage: str, seconds: float) -> None:
        run.observe_step(seconds)
        clocks.add(f"train_{stage}", seconds)

    def latest_checkpoint() -> Path | None:
        if not checkpoint_key:
            return None
        check_checkpoint_files(storage.list(checkpoint_key.rstrip("/") + "/"), checkpoint_key)
        log.info("job %s: resuming from %s", run.job_id, checkpoint_key)
        return storage.download_dir(checkpoint_key, workdir / "resume")

    return TrainHooks(progress=progress, should_stop=should_stop, yield_at_checkpoint=run.yield_requested,
                      save_checkpoint=uploader.submit,
                      latest_checkpoint=latest_checkpoint, step_done=step_done,
                      evaluated=lambda stage, seconds: clocks.add(f"eval_{stage}", seconds))


def _register(settings: Settings, storage, run: Run, tenant_id: str, params: TrainParams, result) -> str:
    """Store the trained pipeline as the tenant's model, its evaluation artifacts beside the job."""
    name = f"train-{run.job_id[:8]}"
    extra = {"train_params": params.model_dump(mode="json"), **sampling_defaults.config_entry(result.sampling_defaults)}
    with session_scope(settings) as s:
        if params.method == "lora":
            model = register_adapter_dir(
                s, storage, tenant_id, result.pipeline_dir, base_model=params.base_model, name=name, job_id=run.job_id,
                lora=lora_config(params.lora_rank, params.lora_alpha, params.lora_target_modules),
                metrics=result.metrics, extra_config=extra,
            )
        else:
            model = register_pipeline_dir(s, storage, tenant_id, result.pipeline_dir, name=name, job_id=run.job_id,
                                          metrics=result.metrics, extra_config=extra)
        eval_prefix = f"{job_prefix(tenant_id, run.job_id)}/eval"
        artifacts = {}
        for name, path in result.artifacts.items():
            key = f"{eval_prefix}/{name}"
            storage.put_file(key, path, content_type="image/png" if name.endswith(".png") else "application/octet-stream")
            artifacts[name] = key
        model.metrics = {**(result.metrics or {}), "artifacts": artifacts}
        return model.id


class CheckpointUploader:
    """Uploads checkpoints on one background thread, in order, so the training step never waits on
    storage (issue: checkpoint uploads must not stall the step).

    ``submit`` copies the checkpoint into a private staging folder (local disk: the loop prunes its
    own copies) and queues the upload; the job's checkpoint pointer moves (fenced by the attempt)
    only once every file is stored, then checkpoints beyond the last ``keep`` are deleted. At most
    ``max_pending`` uploads wait; beyond that ``submit`` waits for the oldest (bounded disk). A
    failed upload is raised by the next ``submit`` or by ``wait``."""

    def __init__(self, storage, run: Run, tenant_id: str, keep: int, staging: Path, *, saved: list[str],
                 max_pending: int = 2):
        self.storage, self.run, self.tenant_id, self.keep = storage, run, tenant_id, keep
        self.staging, self.saved, self.max_pending = staging, saved, max_pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldmq-checkpoint")
        self.pending: deque[Future] = deque()

    def submit(self, step: int, local: Path) -> None:
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.max_pending):
            self.pending.popleft().result()  # raises an earlier upload's failure
        staged = self.staging / f"step-{step:08d}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(local, staged)
        ctx = contextvars.copy_context()  # log lines keep the job's id and tenant
        self.pending.append(self.pool.submit(ctx.run, self._upload, step, staged))

    def _upload(self, step: int, staged: Path) -> None:
        prefix = checkpoint_prefix(self.tenant_id, self.run.job_id, step) + f"-a{self.run.attempt}"
        clock = time.perf_counter()
        self.storage.upload_dir(staged, prefix)
        # fenced: a stale run cannot move the pointer
        self.run.set_checkpoint(prefix, {"step": step, "metrics": checkpoint_metrics(staged)})
        shutil.rmtree(staged, ignore_errors=True)
        self.saved.append(prefix)
        while len(self.saved) > self.keep:
            old = self.saved.pop(0)
            for key in self.storage.list(old + "/"):
                self.storage.delete(key)
        log.info("job %s: checkpoint of step %d stored in %.1f s", self.run.job_id, step, time.perf_counter() - clock)

    def wait(self) -> None:
        """Block until every queued upload is stored; raise the first failure."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        """Finish what is in flight, drop what has not started (the job is ending)."""
        self.pool.shutdown(wait=True, cancel_futures=False)


METRICS_EVENT_MAX_BYTES = 16 * 1024


def checkpoint_metrics(ckpt: Path) -> dict:
    """The evaluation stored with a checkpoint (``metrics.json``: a few numbers, ~300 bytes), for
    its ``checkpoint`` event; {} when it was not evaluated, or when the file is not a small JSON
    object (an event row stays small)."""
    path = ckpt / "metrics.json"
    try:
        if path.stat().st_size > METRICS_EVENT_MAX_BYTES:
            return {}
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# What a checkpoint may hold: tensors as safetensors, state as JSON, evaluation images as PNG.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".png")


def check_checkpoint_files(keys: list[str], prefix: str) -> None:
    """Refuse a checkpoint holding anything else (a ``.pt``/``.bin`` pickle above all) before any
    byte of it is downloaded, let alone unpickled."""
    bad = sorted(k for k in keys if not k.lower().endswith(CHECKPOINT_SUFFIXES))
    if bad:
        names = ", ".join(k[len(prefix):].lstrip("/") or k for k in bad)
        raise JobError("unsafe_checkpoint", "the checkpoint to resume from holds files that are not safetensors/JSON/PNG "
                                            f"(pickles are never loaded): {names}")


def _scratch(settings: Settings) -> Path:
    path = settings.var_dir / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


