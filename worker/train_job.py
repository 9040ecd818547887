"""Train jobs: glue between the job runner (leases, progress, storage) and ``worker.training``.

Checkpoints go to storage under the job's prefix, one folder per step; the pointer to the latest
lives in the database (``jobs.checkpoint_key``), and only the last K are kept. A job that is
restarted downloads its latest checkpoint and resumes from it. At the end the pipeline is
registered as a model, with its evaluation (metrics, loss curve, sample grid) beside it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path


from shared.db import session_scope
from shared.jobstate import LeaseLost
from shared.models import Dataset, Job, Model
from shared.registry import register_pipeline_dir
from shared.settings import Settings
from shared.storage import checkpoint_prefix, get_storage, job_prefix
from shared.train_schema import TrainParams
from worker import metrics
from worker.pipelines import resolve_device
from worker.runner import JobError, JobRun

log = logging.getLogger(__name__)


def run_train(settings: Settings, run: JobRun) -> dict:
    import torch

    from worker.data import load_dataset
    from worker.training import TrainHooks, TrainingStopped, train

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

    workdir = Path(tempfile.mkdtemp(prefix=f"train-{run.job_id}-", dir=_scratch(settings)))
    try:
        archive = None
        if dataset is not None:
            archive = workdir / Path(dataset.key).name
            archive.write_bytes(storage.get_bytes(dataset.key))
        try:
            data = load_dataset(params.dataset, archive_path=archive, resolution=params.resolution)
        except ValueError as exc:
            raise JobError("invalid_dataset", str(exc)) from exc
        base_dir = storage.download_dir(base.key, workdir / "base") if base is not None else None

        saved: list[str] = []
        if checkpoint_key:
            saved.append(checkpoint_key)

        device = resolve_device(settings.worker_device)

        def progress(info: dict) -> None:
            # No run.check() here: should_stop() (next) stops the loop *after* a checkpoint.
            total = max(1, int(info.get("total_steps") or 1))
            run.progress(min(1.0, float(info.get("step", 0)) / total), info)
            metrics.sample_gpu_memory(device)

        def should_stop() -> bool:
            try:
                run.check()
            except Exception:
                return True
            return False

        def save_checkpoint(step: int, local: Path) -> None:
            prefix = checkpoint_prefix(tenant_id, run.job_id, step) + f"-a{run.attempt}"
            storage.upload_dir(local, prefix)
            run.set_checkpoint(prefix)  # fenced: a stale run cannot move the pointer
            saved.append(prefix)
            while len(saved) > params.keep_checkpoints:
                old = saved.pop(0)
                for key in storage.list(old + "/"):
                    storage.delete(key)

        def latest_checkpoint() -> Path | None:
            if not checkpoint_key:
                return None
            check_checkpoint_files(storage.list(checkpoint_key.rstrip("/") + "/"), checkpoint_key)
            log.info("job %s: resuming from %s", run.job_id, checkpoint_key)
            return storage.download_dir(checkpoint_key, workdir / "resume")

        hooks = TrainHooks(progress=progress, should_stop=should_stop, save_checkpoint=save_checkpoint,
                           latest_checkpoint=latest_checkpoint,
                           step_done=lambda _stage, seconds: metrics.observe_step("train", seconds))
        try:
            result = train(params, workdir=workdir / "run", dataset=data, base_model_dir=base_dir, hooks=hooks,
                           device=device)
        except TrainingStopped:
            run.check()  # raises the precise reason (canceled, lease lost, timeout)
            raise LeaseLost(run.job_id) from None

        run.check()
        with session_scope(settings) as s:
            model = register_pipeline_dir(
                s, storage, tenant_id, result.pipeline_dir, name=f"train-{run.job_id[:8]}", job_id=run.job_id,
                metrics=result.metrics, extra_config={"train_params": params.model_dump(mode="json")},
            )
            eval_prefix = f"{job_prefix(tenant_id, run.job_id)}/eval"
            artifacts = {}
            for name, path in result.artifacts.items():
                key = f"{eval_prefix}/{name}"
                storage.put_file(key, path, content_type="image/png" if name.endswith(".png") else "application/octet-stream")
                artifacts[name] = key
            model.metrics = {**(result.metrics or {}), "artifacts": artifacts}
            model_id = model.id
        return {"model_id": model_id}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# What a checkpoint may hold: tensors as safetensors, state as JSON, evaluation images as PNG.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".png")


def check_checkpoint_files(keys: list[str], prefix: str) -> None:
    """Refuse a checkpoint holding anything else (a ``.pt``/``.bin`` pickle above all) before any
    byte of it is downloaded, let alone unpickled."""
    bad = sorted(k for k in keys if not k.lower().endswith(CHECKPOINT_SUFFIXES))
    if bad:
        names = ", ".join(k[len(prefix):].lstrip("/") or k for k in bad)
        raise JobError("unsafe_checkpoint", f"checkpoint {prefix!r} holds files that are not safetensors/JSON/PNG "
                                            f"(pickles are never loaded): {names}")


def _scratch(settings: Settings) -> Path:
    path = settings.var_dir / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


