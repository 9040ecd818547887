"""Sample jobs: what to make, from which model, and where it goes.

The model side (batches, streams, embeddings) is ``worker.model.sampling``; this module reads the
job from the database, fetches the model from storage, packs companion jobs and hands the images
to the output writer.

- Every image has its own seeded ``torch.Generator`` and is computed in a batch of a *fixed* size
  (the last batch is padded): a row of a batch does not depend on the other rows, and with the
  batch size fixed the kernels are the same, so each image is bit-identical to what it would be
  alone for its seed, whatever it is batched with (tests/worker/test_sampling.py proves it).
- Rows are packed into model batches across the whole job, grouped by (steps, guidance, mode,
  strength): text, image-to-image and inpainting items never share a batch. The
  batch size is set per model or per worker, or found from free memory (``auto_batch_size``).
- On a CPU, two batches are computed side by side (``ModelStreams``, ``plan_streams``): a small
  model's kernels use two cores better as two single-threaded batches than as one batch split
  over both. Each stream has its own scheduler; results are handed on in order.
- Text embeddings of repeated prompts (and the empty negative prompt) are computed once.
- PNG encoding, uploads and the fenced DB records run in a writer process of their own while the
  model computes the next batch (``worker.runtime.outputs`` says why not a thread); at most
  ``MAX_PENDING`` batches wait, so memory stays bounded.
- PNGs go under deterministic keys (tenant/job/row/index); rows an earlier attempt recorded are
  skipped, so a retry never writes an output twice. Each PNG carries how to make it again (model
  id and content hash, sampler, steps, guidance, prompts, seed, size, dtype, device, versions) in
  text chunks (``worker.jobs.provenance``); the manifest lists the same.
- ``output_format: webdataset``: the same images go into WebDataset tar shards instead
  (``worker.jobs.shards`` says which image goes into which; ``worker.runtime.shards`` writes them
  create-only under deterministic keys and records each with its images once).
- Cross-job micro-batching: a run also claims other queued jobs of the same model, size and
  scheduler (each with its own claim, fencing token and heartbeat) while the images of the run
  stay under ``cobatch_max_items``, and packs their rows into the same model batches. Their own
  Celery messages later find them claimed and do nothing. If the run stops, they are released.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

from sqlalchemy import select

from shared import jobstate
from shared.adapters import ADAPTER_WEIGHTS, base_of
from shared.catalog import DEFAULT_SCHEDULER, denoising_steps, uses_guidance
from shared.db import session_scope
from shared.models import Job, JobOutput, JobRow, Model
from shared.pieces import Piece, manifest_turn
from shared.pipelines import PipelineRejected
from shared.settings import Settings
from shared.storage import get_storage
from worker.jobs.base import JobError, Run
from worker.jobs.inputs import InputImages
from worker.jobs.manifest import write_manifest
from worker.jobs.provenance import image_params, png_text, row_steps_guidance, run_params
from shared import estimates
from worker.jobs.shards import ShardPlan, piece_images, plan_shards
from worker.model.pipelines import PipelineCache, device_kind, fetch_dir_once, pipeline_view, resolve_device
from worker.model.sampling import (
    CPU_AUTO_BATCH,
    EmbeddingCache,
    Item,
    ModelStreams,
    auto_batch_size,
    batches,
    generate,
)

log = logging.getLogger(__name__)
SEED_MOD = 2**31


def plan_items(job: Job, rows: list[JobRow], done: set[tuple[int, int]], work: int = 0) -> list[Item]:
    """The images still to make. Image ``i`` of a row uses seed ``(row.seed + i) mod 2^31``."""
    p = job.params
    items = []
    for r in rows:
        steps, guidance = row_steps_guidance(p, r)
        for i in range(r.num_images):
            if (r.row, i) in done:
                continue
            items.append(Item(r.row, i, (r.seed + i) % SEED_MOD, r.prompt, r.negative_prompt or "", guidance, steps,
                              work, init_image=r.init_image, strength=r.strength, mask_image=r.mask_image))
    return items


def plan_streams(settings: Settings, device: str) -> tuple[int, int]:
    """(model streams, torch threads per stream) for this worker (``sample_streams``, ``worker_threads``)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    on_cpu = device == "cpu"
    streams = settings.sample_streams or (min(2, cores) if on_cpu else 1)
    threads = settings.worker_threads or (max(1, cores // streams) if on_cpu else torch.get_num_threads())
    return streams, threads


_CACHE: PipelineCache | None = None


def pipeline_cache(settings: Settings) -> PipelineCache:
    """The worker process's pipeline cache (``pipeline_cache_size``, ``pipeline_cache_mb``)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = PipelineCache(settings.var_dir / "cache" / "models", settings.pipeline_cache_size,
                               settings.pipeline_cache_mb * 2**20 or None)
    return _CACHE


def load_pipeline(settings: Settings, model: Model, device: str):
    """The model's pipeline on ``device``, from the cache or fetched from storage. A LoRA model is
    its base's cached pipeline with the model's adapter made the active one (``use_adapter``): many
    LoRA models over one base load the base once; a pipeline model gets its adapters disabled."""
    from worker.model.lora import use_adapter

    storage = get_storage(settings)
    base = _base_model(settings, model)
    pipe = pipeline_cache(settings).get(
        base.id, lambda local: storage.download_dir(base.key, local), device,
        dtype=settings.worker_dtype, channels_last=settings.worker_channels_last, compile_unet=settings.worker_compile,
    )
    if base is model:
        use_adapter(pipe, None)
    else:
        local = fetch_dir_once(settings.var_dir / "cache" / "adapters" / model.id,
                               lambda d: storage.download_dir(model.key, d), ADAPTER_WEIGHTS)
        try:
            use_adapter(pipe, model.id, local)
        except PipelineRejected as exc:  # not the one safetensors file: never loaded
            raise JobError("unsafe_model", f"the LoRA adapter was refused: {exc}") from None
    return pipe


def _base_model(settings: Settings, model: Model) -> Model:
    """The pipeline model to load: ``model`` itself, or the base a LoRA model names."""
    base_id = base_of(model.config)
    if base_id is None:
        return model
    with session_scope(settings) as s:
        base = s.get(Model, base_id)
        if base is None:  # deletion refuses this while the LoRA model exists
            raise JobError("model_not_found", f"base model {base_id!r} of LoRA model {model.id!r} no longer exists")
    return base


@dataclass
class JobWork:
    """One job being sampled: its run handle, where its outputs go, and its remaining items."""

    run: Run
    job: Job
    tenant_id: str
    items: list[Item]
    made: int
    total: int
    shards: ShardPlan | None = None  # output_format webdataset: each image's shard


def is_webdataset(job: Job) -> bool:
    return job.params.get("output_format") == "webdataset"


def load_work(settings: Settings, run: Run, index: int = 0) -> tuple[JobWork, Model | None]:
    with session_scope(settings) as s:
        job = s.get(Job, run.job_id)
        piece = Piece.of(job)
        if piece is not None:  # a piece of a spread job: the job's rows, model and outputs; the piece's images
            job = s.get(Job, piece.parent_id)
        rows = list(s.scalars(select(JobRow).where(JobRow.job_id == job.id).order_by(JobRow.row)))
        model = s.get(Model, job.model_id) if job.model_id else None
        done = {(o.row, o.index) for o in s.scalars(select(JobOutput).where(JobOutput.job_id == job.id))}
    items, made, total = plan_items(job, rows, done, index), len(done), job.total_items or 1
    shards = plan_shards(job.params, rows) if is_webdataset(job) else None
    if piece is not None:  # a WebDataset job's piece is whole shards
        mine = None if shards is None else piece_images(shards, int(job.params["shard_images"]), piece.start,
                                                           piece.end)
        items, made, total = piece.narrow(items, rows, done, mine)
    return JobWork(run, job, job.tenant_id, items, made, total, shards), model


def batch_size_for(settings: Settings, model: Model) -> int:
    """The fixed model batch: the model's own setting if it has one, else the worker's (0: auto)."""
    return int((model.config or {}).get("sample_batch_size") or settings.sample_batch_size)


def _compatible(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("scheduler", "width", "height"))


def claim_companions(settings: Settings, lead: JobWork, budget: int) -> list[JobWork]:
    """Claim queued jobs of the same model that can share this run's batches (bounded), in their
    tenants' queue order (``sched_key``: priority, then age); a claim by id still skips a tenant at
    its ``max_running``."""
    if budget <= 0:
        return []
    with session_scope(settings) as s:
        candidates = s.execute(
            select(Job.id, Job.params, Job.total_items)
            .where(Job.status == "queued", Job.type == "sample", Job.model_id == lead.job.model_id,
                   Job.id != lead.job.id, Job.cancel_requested.is_(False))
            .order_by(Job.sched_key).limit(50)
        ).all()
    works: list[JobWork] = []
    for job_id, params, total in candidates:
        if total > budget or not _compatible(params, lead.job.params):
            continue
        run = lead.run.claim_companion(job_id)
        if run is None:
            continue  # another worker took it first
        work, _ = load_work(settings, run, index=len(works) + 1)
        works.append(work)
        budget -= total
    if works:
        log.info("job %s: packing %d more job(s) into its batches: %s", lead.job.id, len(works),
                 ", ".join(w.job.id for w in works))
        with session_scope(settings) as s:  # one device batch: charged once, split by images
            jobstate.share_charge(s, [(w.run.job_id, w.run.attempt, len(w.items)) for w in [lead, *works]], settings)
    return works


def _end_companion(w: JobWork, end) -> None:
    """Record a packed job's end (``end(run)``); on failure its lease expires and the sweeper requeues it."""
    try:
        end(w.run)
    except Exception:
        log.exception("job %s: could not record its end; its lease will expire and the sweeper requeue it", w.job.id)
    finally:
        w.run.stop()  # its heartbeat


def _auto_size(pipe, model: Model, lead: JobWork, scheduler: str, embeddings: EmbeddingCache, *, device: str,
               width: int, height: int, streams: int) -> int:
    """The batch size found from free memory, probed on the run's first image."""
    if not lead.items:
        return CPU_AUTO_BATCH  # nothing left to make: any size will do
    # Guidance on, whatever the first row asks: packed rows may use it, and it doubles the U-Net's batch.
    first = replace(lead.items[0], steps=1, guidance_scale=max(lead.items[0].guidance_scale, 2.0),
                    init_image=None, strength=None, mask_image=None)  # text: no input image to fetch

    def probe(n: int) -> None:
        generate(pipeline_view(pipe, scheduler), [first], batch_size=n, width=width, height=height, device=device,
                 embeddings=embeddings)

    return auto_batch_size(device, (model.id, width, height, streams), probe, streams=streams)


@dataclass
class _Setup:
    """How a run makes its images: the pipeline on its device, the size, the sampler, the fixed
    batch, the model streams, and what every PNG of the run records (``common``)."""

    pipe: object
    device: str
    width: int
    height: int
    scheduler: str
    size: int
    n_streams: int
    threads: int
    embeddings: EmbeddingCache
    common: dict
    inputs: InputImages  # image-to-image and inpainting inputs, fetched once per run


def _set_up(settings: Settings, lead: JobWork, model: Model) -> _Setup:
    device = resolve_device(settings.worker_device)
    pipe = load_pipeline(settings, model, device)
    scale = pipe.vae_scale_factor
    width = lead.job.params.get("width") or pipe.unet.config.sample_size * scale
    height = lead.job.params.get("height") or pipe.unet.config.sample_size * scale
    embeddings = EmbeddingCache(pipe, device)
    n_streams, threads = plan_streams(settings, device)
    scheduler = lead.job.params.get("scheduler", DEFAULT_SCHEDULER)
    common = run_params(settings, model, scheduler=scheduler, pipe=pipe, device=device)  # what every PNG records
    size = batch_size_for(settings, model) or _auto_size(pipe, model, lead, scheduler, embeddings, device=device,
                                                        width=width, height=height, streams=n_streams)
    return _Setup(pipe, device, width, height, scheduler, size, n_streams, threads, embeddings, common,
                  InputImages(settings))


def run_sample(settings: Settings, run: Run) -> dict:
    """Make every image of the job (and of the jobs packed into its batches) not made yet."""
    lead, model = load_work(settings, run)
    if model is None:
        raise JobError("model_not_found", f"model {lead.job.params.get('model')!r} no longer exists")
    setup = _set_up(settings, lead, model)
    works = [lead] + claim_companions(settings, lead, settings.cobatch_max_items - len(lead.items))
    log.info("job %s: %d images to make (%d done before), batch %d, %d stream(s) of %d thread(s)", lead.job.id,
             sum(len(w.items) for w in works), lead.made, setup.size, setup.n_streams, setup.threads)
    stopped: set[int] = set()  # packed jobs that left the run (canceled, lease lost)
    timings: list[tuple[bool, int, float]] = []
    clock = time.perf_counter()
    n_batches = _make_images(run, works, setup, stopped, timings)
    record_timings(run, model.id, setup, timings, time.perf_counter() - clock)
    with manifest_turn(settings, run.job_id):  # pieces of one job write its manifest in turn
        write_manifest(settings, lead.tenant_id, lead.job.id, setup.common)
    for i, w in enumerate(works[1:], start=1):
        if i in stopped:
            continue

        def finish(r, w=w):
            write_manifest(settings, w.tenant_id, w.job.id, setup.common)
            r.succeed({"model_id": w.job.model_id})
        _end_companion(w, finish)
    return {"model_id": model.id, "batches": n_batches, "streams": setup.n_streams,
            "packed_jobs": [w.job.id for w in works[1:]]}


def record_timings(run: Run, model_id: str, setup: _Setup, timings: list[tuple[bool, int, float]],
                   span_s: float) -> None:
    """Keep the run's seconds per denoising step of one batch, with guidance and without, for
    estimates (``shared.estimates``). ``timings``: (guided, steps, wall seconds) per batch. Streams
    compute batches side by side, so each figure is scaled by the run's span over the sum of batch
    walls: what a batch-step cost the job, not one stream (2 CPU streams: about half)."""
    total_wall = sum(w for _, _, w in timings)
    if not timings or total_wall <= 0:
        return
    overlap = min(1.0, span_s / total_wall)
    for guided in (False, True):
        mine = [(n, w) for g, n, w in timings if g == guided]
        steps = sum(n for n, _ in mine)
        if steps:
            run.record_timing(kind=estimates.DENOISE, model_key=model_id, size=estimates.size_key(setup.width, setup.height),
                              batch=setup.size, guidance=guided, device=device_kind(setup.device),
                              seconds=sum(w for _, w in mine) / steps * overlap, units=steps)


def _make_images(run: Run, works: list[JobWork], setup: _Setup, stopped: set[int],
                 timings: list[tuple[bool, int, float]]) -> int:
    """Compute the works' items in fixed batches on the model streams and hand each batch to the
    output writer; a packed job whose run stops leaves (``stopped``), the run itself raises. On the
    way out by an error, the packed jobs still in are released. Appends (guided, steps, seconds) of
    each batch's denoising to ``timings``. Returns the number of batches."""
    streams = ModelStreams(setup.pipe, setup.scheduler, setup.n_streams, setup.threads)
    writer = run.output_writer()

    def dispatch():
        """The batches to compute, each checked against the run (and its packed jobs) as it goes out."""
        for batch in batches([it for w in works for it in w.items], setup.size):
            run.check()
            for i, w in enumerate(works[1:], start=1):  # a packed job that was canceled or lost leaves
                if i not in stopped:
                    try:
                        w.run.check()
                    except Exception as exc:
                        stopped.add(i)
                        writer.drain()
                        _end_companion(w, lambda r, exc=exc: r.end_by(exc))
            batch = [it for it in batch if it.work not in stopped]
            if batch:
                yield batch

    def compute(view, batch):
        clock = {"batch": time.perf_counter(), "step": time.perf_counter()}

        def on_step(_step: int) -> None:
            now = time.perf_counter()
            run.observe_step(now - clock["step"])
            clock["step"] = now
            streams.check()
            run.check()

        arrays = generate(view, batch, batch_size=setup.size, width=setup.width, height=setup.height,
                          device=setup.device, embeddings=setup.embeddings, on_step=on_step,
                          load_image=lambda it, image_id: setup.inputs.get(works[it.work].tenant_id, image_id))
        wall = time.perf_counter() - clock["batch"]
        run.images_made(len(batch), wall)
        timings.append((uses_guidance(batch[0].guidance_scale), denoising_steps(batch[0].steps, batch[0].strength),
                        wall))  # list.append: thread-safe
        return arrays

    n_batches = 0
    try:
        for batch, arrays in streams.imap(compute, dispatch()):
            run.device_memory(setup.device)
            n_batches += 1
            for i, w in enumerate(works):
                mine = [k for k, it in enumerate(batch) if it.work == i]
                if mine and i not in stopped:
                    w.made += len(mine)
                    writer.submit(job_id=w.job.id, attempt=w.run.attempt, tenant_id=w.tenant_id, lead=i == 0,
                                  made=w.made, total=w.total, arrays=arrays[mine],
                                  meta=[(batch[k].row, batch[k].index, batch[k].seed) for k in mine],
                                  text=[png_text(image_params(setup.common, w.job.id, batch[k], setup.width,
                                                              setup.height)) for k in mine],
                                  shards=None if w.shards is None else
                                  [w.shards[(batch[k].row, batch[k].index)] for k in mine], run_id=w.run.job_id)
        writer.drain()
    except BaseException:
        streams.close()  # first: batches still computing stop at their next step
        writer.close()  # batches still being written finish, fenced; nobody waits for them
        for i, w in enumerate(works[1:], start=1):
            if i not in stopped:
                _end_companion(w, lambda r: r.release("the run they were packed into stopped"))
        raise
    streams.close()
    writer.close()
    return n_batches
