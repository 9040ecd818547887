"""Sample jobs: every row of the job, each image with its own seeded ``torch.Generator``, PNGs
under deterministic keys (tenant/job/row/index), progress as it goes, and a JSON manifest.

Rows already recorded (by an earlier attempt that died) are skipped, so a retry finishes the job
without producing any output twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from itertools import groupby

from sqlalchemy import select

from shared.db import session_scope
from shared.models import Job, JobOutput, JobRow, Model, Tenant
from shared.settings import Settings
from shared.storage import get_storage, manifest_key, output_key, sha256_hex
from worker.pipelines import make_scheduler, pipeline_cache, resolve_device
from worker.runner import JobError, JobRun

log = logging.getLogger(__name__)
SEED_MOD = 2**31


@dataclass(frozen=True)
class Item:
    row: int
    index: int
    seed: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    steps: int


def plan_items(job: Job, rows: list[JobRow], done: set[tuple[int, int]]) -> list[Item]:
    """The images still to make. Image ``i`` of a row uses seed ``(row.seed + i) mod 2^31``."""
    p = job.params
    items = []
    for r in rows:
        for i in range(r.num_images):
            if (r.row, i) in done:
                continue
            items.append(Item(r.row, i, (r.seed + i) % SEED_MOD, r.prompt, r.negative_prompt or "",
                              r.guidance_scale if r.guidance_scale is not None else p["guidance_scale"],
                              r.steps if r.steps is not None else p["steps"]))
    return items


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Group items that share (steps, guidance) and cut them into model batches."""
    out: list[list[Item]] = []
    key = lambda it: (it.steps, it.guidance_scale)  # noqa: E731
    for _, group in groupby(sorted(items, key=lambda it: (key(it), it.row, it.index)), key=key):
        group = list(group)
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generate(pipe, batch: list[Item], *, width: int, height: int, device: str, on_step=None):
    """One pipeline call for a batch; per-image generators make each image depend on its seed alone."""
    import torch

    gen_device = "cpu" if device == "cpu" else device
    generators = [torch.Generator(gen_device).manual_seed(it.seed) for it in batch]

    def _callback(_pipe, step, _t, kwargs):
        if on_step is not None:
            on_step(step)
        return kwargs

    with torch.inference_mode():
        out = pipe(
            prompt=[it.prompt for it in batch],
            negative_prompt=[it.negative_prompt for it in batch] if batch[0].guidance_scale > 1 else None,
            num_inference_steps=batch[0].steps,
            guidance_scale=batch[0].guidance_scale,
            generator=generators,
            width=width,
            height=height,
            output_type="pil",
            callback_on_step_end=_callback,
        )
    return out.images


def run_sample(settings: Settings, run: JobRun) -> dict:
    import torch

    if settings.worker_threads:
        torch.set_num_threads(settings.worker_threads)
    storage = get_storage(settings)
    with session_scope(settings) as s:
        job = s.get(Job, run.job_id)
        rows = list(s.scalars(select(JobRow).where(JobRow.job_id == job.id).order_by(JobRow.row)))
        model = s.get(Model, job.model_id) if job.model_id else None
        tenant = s.get(Tenant, job.tenant_id)
        done = {(o.row, o.index) for o in s.scalars(select(JobOutput).where(JobOutput.job_id == job.id))}
    if model is None:
        raise JobError("model_not_found", f"model {job.params.get('model')!r} no longer exists")
    device = resolve_device(settings.worker_device)
    pipe = pipeline_cache(settings).get(model.id, model.key, storage, device)
    pipe.scheduler = make_scheduler(job.params.get("scheduler", "dpm-solver++"), pipe.scheduler.config)
    scale = pipe.vae_scale_factor
    width = job.params.get("width") or pipe.unet.config.sample_size * scale
    height = job.params.get("height") or pipe.unet.config.sample_size * scale

    items = plan_items(job, rows, done)
    total = job.total_items or 1
    made = len(done)
    log.info("job %s: %d images to make (%d done before)", job.id, len(items), made)
    for batch in batches(items, settings.sample_batch_size):
        run.check()
        images = generate(pipe, batch, width=width, height=height, device=device, on_step=lambda _s: run.check())
        for it, image in zip(batch, images):
            data = png_bytes(image)
            key = output_key(tenant.id, job.id, it.row, it.index)
            # Same seed -> same pixels, so a retry's re-write of this key stores identical bytes.
            storage.put_bytes(key, data, content_type="image/png")
            run.record_output(row=it.row, index=it.index, seed=it.seed, key=key, width=image.width,
                              height=image.height, sha256=sha256_hex(data))
        made += len(batch)
        run.progress(made / total, {"images_done": made, "images_total": total})
    write_manifest(settings, tenant.id, job.id)
    return {"model_id": model.id}


def _neutralise(cell):
    """CSV injection: a cell starting with = + - @ would be a formula in a spreadsheet."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def write_manifest(settings: Settings, tenant_id: str, job_id: str) -> None:
    storage = get_storage(settings)
    with session_scope(settings) as s:
        rows = s.execute(
            select(JobOutput, JobRow.prompt, JobRow.negative_prompt)
            .join(JobRow, (JobRow.job_id == JobOutput.job_id) & (JobRow.row == JobOutput.row))
            .where(JobOutput.job_id == job_id).order_by(JobOutput.row, JobOutput.index)
        ).all()
    entries = [{"row": o.row, "index": o.index, "seed": o.seed, "prompt": prompt, "negative_prompt": neg,
                "key": o.key, "width": o.width, "height": o.height, "sha256": o.sha256} for o, prompt, neg in rows]
    storage.put_bytes(manifest_key(tenant_id, job_id),
                      json.dumps({"job_id": job_id, "outputs": entries}, indent=1).encode(),
                      content_type="application/json")
    buf = io.StringIO()
    fields = ["row", "index", "seed", "prompt", "negative_prompt", "key", "width", "height", "sha256"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for e in entries:
        w.writerow({k: _neutralise(v) for k, v in e.items()})
    storage.put_bytes(manifest_key(tenant_id, job_id).replace(".json", ".csv"), buf.getvalue().encode(),
                      content_type="text/csv")
