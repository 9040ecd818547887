"""Sample jobs at the speed of the model itself.

- Every image has its own seeded ``torch.Generator`` and is computed in a batch of a *fixed* size
  (the last batch is padded): a row of a batch does not depend on the other rows, and with the
  batch size fixed the kernels are the same, so each image is bit-identical to what it would be
  alone for its seed, whatever it is batched with (tests/worker/test_sampling.py proves it).
- Rows are packed into model batches across the whole job, grouped by (steps, guidance). The
  batch size is set per model or per worker, or found from free memory (``auto_batch_size``).
- On a CPU, two batches are computed side by side (``ModelStreams``, ``plan_streams``): a small
  model's kernels use two cores better as two single-threaded batches than as one batch split
  over both. Each stream has its own scheduler; results are handed on in order.
- Text embeddings of repeated prompts (and the empty negative prompt) are computed once.
- PNG encoding, uploads and the fenced DB records run in a writer process of their own while the
  model computes the next batch (worker/outputs.py says why not a thread); at most
  ``MAX_PENDING`` batches wait, so memory stays bounded.
- PNGs go under deterministic keys (tenant/job/row/index); rows an earlier attempt recorded are
  skipped, so a retry never writes an output twice.
- Cross-job micro-batching: a run also claims other queued jobs of the same model, size and
  scheduler (each with its own claim, fencing token and heartbeat) while the images of the run
  stay under ``cobatch_max_items``, and packs their rows into the same model batches. Their own
  Celery messages later find them claimed and do nothing. If the run stops, they are released.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import groupby

from sqlalchemy import select

from shared import jobstate
from shared.db import session_scope
from shared.models import Job, JobOutput, JobRow, Model, Tenant
from shared.settings import Settings
from shared.storage import get_storage, manifest_key
from worker import metrics
from worker.outputs import OutputWriter
from worker.pipelines import pipeline_cache, pipeline_view, resolve_device
from worker.runner import JobError, JobRun, Outcome, classify, record_outcome, worker_identity

log = logging.getLogger(__name__)
SEED_MOD = 2**31


@dataclass(frozen=True)
class Item:
    """One image to make; ``work`` is the index of its job in the run (0: the job the run was for)."""

    row: int
    index: int
    seed: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    steps: int
    work: int = 0


def plan_items(job: Job, rows: list[JobRow], done: set[tuple[int, int]], work: int = 0) -> list[Item]:
    """The images still to make. Image ``i`` of a row uses seed ``(row.seed + i) mod 2^31``."""
    p = job.params
    items = []
    for r in rows:
        for i in range(r.num_images):
            if (r.row, i) in done:
                continue
            items.append(Item(r.row, i, (r.seed + i) % SEED_MOD, r.prompt, r.negative_prompt or "",
                              r.guidance_scale if r.guidance_scale is not None else p["guidance_scale"],
                              r.steps if r.steps is not None else p["steps"], work))
    return items


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Group items that share (steps, guidance) and cut them into model batches."""
    out: list[list[Item]] = []
    key = lambda it: (it.steps, it.guidance_scale)  # noqa: E731
    for _, group in groupby(sorted(items, key=lambda it: (key(it), it.work, it.row, it.index)), key=key):
        group = list(group)
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


class EmbeddingCache:
    """Text embeddings by prompt (LRU): a CSV that repeats prompts encodes each once. Shared by
    the model streams (one at a time: a fast tokenizer must not be used from two threads at once)."""

    def __init__(self, pipe, device: str, capacity: int = 4096):
        self.pipe, self.device, self.capacity = pipe, device, capacity
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_many(self, prompts: list[str]):
        with self._lock:
            return self._get_many(prompts)

    def _get_many(self, prompts: list[str]):
        import torch

        missing = list(dict.fromkeys(p for p in prompts if p not in self._items))
        if missing:
            self.misses += len(missing)
            with torch.inference_mode():
                embeds, _ = self.pipe.encode_prompt(missing, self.device, 1, False)
            for p, e in zip(missing, embeds):
                self._items[p] = e
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        self.hits += len(prompts) - len(missing)
        for p in prompts:
            self._items.move_to_end(p)
        return torch.stack([self._items[p] for p in prompts])


def generate(pipe, batch: list[Item], *, batch_size: int, width: int, height: int, device: str,
             embeddings: EmbeddingCache, on_step=None):
    """One pipeline call for ``batch`` padded to ``batch_size``; returns float arrays (H, W, 3) in [0, 1]."""
    import torch

    padded = batch + [batch[-1]] * (batch_size - len(batch))
    generators = [torch.Generator(device).manual_seed(it.seed) for it in padded]
    cfg = batch[0].guidance_scale > 1
    prompt_embeds = embeddings.get_many([it.prompt for it in padded])
    negative = embeddings.get_many([it.negative_prompt for it in padded]) if cfg else None

    def _callback(_pipe, step, _t, kwargs):
        if on_step is not None:
            on_step(step)
        return kwargs

    with torch.inference_mode():
        out = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=batch[0].steps,
            guidance_scale=batch[0].guidance_scale,
            generator=generators,
            width=width,
            height=height,
            output_type="np",
            callback_on_step_end=_callback,
        )
    return out.images[: len(batch)]


def plan_streams(settings: Settings, device: str) -> tuple[int, int]:
    """(model streams, torch threads per stream) for this worker (``sample_streams``, ``worker_threads``)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    on_cpu = device == "cpu"
    streams = settings.sample_streams or (min(2, cores) if on_cpu else 1)
    threads = settings.worker_threads or (max(1, cores // streams) if on_cpu else torch.get_num_threads())
    return streams, threads


class StreamStopped(Exception):
    """A batch still computing when its run stopped: dropped (never reaches the writer)."""


class ModelStreams:
    """Model batches computed ``n`` at a time, each on a thread of its own with its own view of the
    pipeline (the weights are shared, the scheduler's step state is not) and ``threads`` torch
    threads. ``imap`` hands results back in submission order with at most ``n + 1`` batches out, so
    a stream that finishes finds its next batch waiting. Each batch is computed exactly as it would
    be alone (fixed batch size, fixed threads per stream), so streams change no pixel."""

    def __init__(self, pipe, scheduler: str, n: int, threads: int):
        import torch

        self.n = n
        self.threads_before = torch.get_num_threads()
        self.views: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n):
            self.views.put(pipeline_view(pipe, scheduler))
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ldmq-model",
                                       initializer=torch.set_num_threads, initargs=(threads,))

    def _call(self, fn, batch):
        if self.stopping.is_set():
            raise StreamStopped()
        view = self.views.get()
        try:
            return fn(view, batch)
        finally:
            self.views.put(view)

    def check(self) -> None:
        """Called between denoising steps: a batch of a stopped run ends at its next step."""
        if self.stopping.is_set():
            raise StreamStopped()

    def imap(self, fn, batches_: Iterable) -> Iterator:
        pending: deque = deque()
        for b in batches_:
            pending.append((b, self.pool.submit(self._call, fn, b)))
            if len(pending) > self.n:
                b0, fut = pending.popleft()
                yield b0, fut.result()
        while pending:
            b0, fut = pending.popleft()
            yield b0, fut.result()

    def close(self) -> None:
        """Stop: queued batches are dropped, computing ones end at their next step; waits for them,
        then gives the process back its torch threads (the next job, a training one say, gets them)."""
        import torch

        self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads_before)


@dataclass
class JobWork:
    """One job being sampled: its run handle, where its outputs go, and its remaining items."""

    run: JobRun
    job: Job
    tenant_id: str
    items: list[Item]
    made: int
    total: int


def load_work(settings: Settings, run: JobRun, index: int = 0) -> tuple[JobWork, Model | None]:
    with session_scope(settings) as s:
        job = s.get(Job, run.job_id)
        rows = list(s.scalars(select(JobRow).where(JobRow.job_id == job.id).order_by(JobRow.row)))
        model = s.get(Model, job.model_id) if job.model_id else None
        tenant = s.get(Tenant, job.tenant_id)
        done = {(o.row, o.index) for o in s.scalars(select(JobOutput).where(JobOutput.job_id == job.id))}
    items = plan_items(job, rows, done, index)
    return JobWork(run, job, tenant.id, items, len(done), job.total_items or 1), model


def batch_size_for(settings: Settings, model: Model) -> int:
    """The fixed model batch: the model's own setting if it has one, else the worker's (0: auto)."""
    return int((model.config or {}).get("sample_batch_size") or settings.sample_batch_size)


AUTO_BATCH_CAP = 64
CPU_AUTO_BATCH = 32
PROBE_IMAGES = 2
_AUTO_SIZES: dict[tuple, int] = {}


def fit_batch(free_bytes: float, per_image_bytes: float, *, streams: int = 1, cap: int = AUTO_BATCH_CAP,
              headroom: float = 0.8) -> int:
    """The largest batch whose images fit ``headroom`` of the free memory, shared by ``streams``."""
    if per_image_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * headroom / streams // per_image_bytes)))


def auto_batch_size(device: str, key: tuple, probe, *, streams: int = 1) -> int:
    """A batch size found from free memory, once per (model, image size, streams) and worker process, so
    that every batch of it on this worker has the same size (and each image its seed's pixels).
    ``probe(n)`` computes one batch of ``n`` images (one step is enough: the peak is per image)."""
    if key in _AUTO_SIZES:
        return _AUTO_SIZES[key]
    if not device.startswith("cuda"):
        size = CPU_AUTO_BATCH  # CPU memory is not measured: the allocator keeps no peak statistics
        log.info("auto batch size on %s: %d (memory not measured on a CPU)", device, size)
    else:
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe(PROBE_IMAGES)
        torch.cuda.synchronize(device)
        per_image = (torch.cuda.max_memory_allocated(device) - base) / PROBE_IMAGES
        size = fit_batch(free, per_image, streams=streams)
        log.info("auto batch size on %s: %d (%.0f MiB an image, %.0f MiB free, %d stream(s))", device, size,
                 per_image / 2**20, free / 2**20, streams)
    _AUTO_SIZES[key] = size
    return size


def _compatible(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("scheduler", "width", "height"))


def claim_companions(settings: Settings, lead: JobWork, budget: int) -> list[JobWork]:
    """Claim queued jobs of the same model that can share this run's batches (FIFO, bounded)."""
    if budget <= 0:
        return []
    with session_scope(settings) as s:
        candidates = s.execute(
            select(Job.id, Job.params, Job.total_items)
            .where(Job.status == "queued", Job.type == "sample", Job.model_id == lead.job.model_id,
                   Job.id != lead.job.id, Job.cancel_requested.is_(False))
            .order_by(Job.created_at).limit(50)
        ).all()
    works: list[JobWork] = []
    owner = worker_identity()
    for job_id, params, total in candidates:
        if total > budget or not _compatible(params, lead.job.params):
            continue
        with session_scope(settings) as s:
            claim = jobstate.claim(s, job_id, owner, settings.lease_seconds)
        if claim is None:
            continue  # another worker took it first
        run = JobRun(settings, claim, "sample", owner)
        run.start()
        work, _ = load_work(settings, run, index=len(works) + 1)
        works.append(work)
        budget -= total
    if works:
        log.info("job %s: packing %d more job(s) into its batches: %s", lead.job.id, len(works),
                 ", ".join(w.job.id for w in works))
    return works


def _end_companions(settings: Settings, works: list[JobWork], outcome: Outcome | None) -> None:
    """Finish (or, when the run stopped early, release) the jobs packed into this run."""
    for w in works:
        try:
            if outcome is None:
                write_manifest(settings, w.tenant_id, w.job.id)
                record_outcome(settings, w.run.claim, "sample", Outcome("succeeded", extra={"model_id": w.job.model_id}))
            else:
                record_outcome(settings, w.run.claim, "sample", outcome)
        except Exception:
            log.exception("job %s: could not record its end; its lease will expire and the sweeper requeue it", w.job.id)
        finally:
            w.run.stop()


def _auto_size(pipe, model: Model, lead: JobWork, scheduler: str, embeddings: EmbeddingCache, *, device: str,
               width: int, height: int, streams: int) -> int:
    """The batch size found from free memory, probed on the run's first image."""
    if not lead.items:
        return CPU_AUTO_BATCH  # nothing left to make: any size will do
    # Guidance on, whatever the first row asks: packed rows may use it, and it doubles the U-Net's batch.
    first = replace(lead.items[0], steps=1, guidance_scale=max(lead.items[0].guidance_scale, 2.0))

    def probe(n: int) -> None:
        generate(pipeline_view(pipe, scheduler), [first], batch_size=n, width=width, height=height, device=device,
                 embeddings=embeddings)

    return auto_batch_size(device, (model.id, width, height, streams), probe, streams=streams)


def run_sample(settings: Settings, run: JobRun) -> dict:
    storage = get_storage(settings)
    lead, model = load_work(settings, run)
    if model is None:
        raise JobError("model_not_found", f"model {lead.job.params.get('model')!r} no longer exists")
    device = resolve_device(settings.worker_device)
    pipe = pipeline_cache(settings).get(model.id, model.key, storage, device, settings)
    scale = pipe.vae_scale_factor
    width = lead.job.params.get("width") or pipe.unet.config.sample_size * scale
    height = lead.job.params.get("height") or pipe.unet.config.sample_size * scale
    embeddings = EmbeddingCache(pipe, device)
    n_streams, threads = plan_streams(settings, device)
    scheduler = lead.job.params.get("scheduler", "dpm-solver++")
    size = batch_size_for(settings, model) or _auto_size(pipe, model, lead, scheduler, embeddings, device=device,
                                                        width=width, height=height, streams=n_streams)

    works = [lead] + claim_companions(settings, lead, settings.cobatch_max_items - len(lead.items))
    items = [it for w in works for it in w.items]
    log.info("job %s: %d images to make (%d done before), batch %d, %d stream(s) of %d thread(s)", lead.job.id,
             len(items), lead.made, size, n_streams, threads)
    stopped: set[int] = set()
    streams = ModelStreams(pipe, scheduler, n_streams, threads)
    writer = OutputWriter(settings)

    def dispatch():
        """The batches to compute, each checked against the run (and its packed jobs) as it goes out."""
        for batch in batches(items, size):
            run.check()
            for i, w in enumerate(works[1:], start=1):  # a packed job that was canceled or lost leaves
                if i not in stopped:
                    try:
                        w.run.check()
                    except Exception as exc:
                        stopped.add(i)
                        writer.drain()
                        _end_companions(settings, [w], classify(exc, job_id=w.job.id))
            batch = [it for it in batch if it.work not in stopped]
            if batch:
                yield batch

    def compute(view, batch):
        clock = {"batch": time.perf_counter(), "step": time.perf_counter()}

        def on_step(_step: int) -> None:
            now = time.perf_counter()
            metrics.observe_step("sample", now - clock["step"])
            clock["step"] = now
            streams.check()
            run.check()

        arrays = generate(view, batch, batch_size=size, width=width, height=height, device=device,
                          embeddings=embeddings, on_step=on_step)
        metrics.images_made(len(batch), time.perf_counter() - clock["batch"])
        return arrays

    n_batches = 0
    try:
        for batch, arrays in streams.imap(compute, dispatch()):
            metrics.sample_gpu_memory(device)
            n_batches += 1
            for i, w in enumerate(works):
                mine = [k for k, it in enumerate(batch) if it.work == i]
                if mine and i not in stopped:
                    w.made += len(mine)
                    writer.submit(job_id=w.job.id, attempt=w.run.attempt, tenant_id=w.tenant_id, lead=i == 0,
                                  made=w.made, total=w.total, arrays=arrays[mine],
                                  meta=[(batch[k].row, batch[k].index, batch[k].seed) for k in mine])
        writer.drain()
    except BaseException:
        streams.close()  # first: batches still computing stop at their next step
        writer.close()  # batches still being written finish, fenced; nobody waits for them
        _end_companions(settings, [w for i, w in enumerate(works[1:], start=1) if i not in stopped],
                        Outcome("released", reason="the run they were packed into stopped"))
        raise
    streams.close()
    writer.close()
    write_manifest(settings, lead.tenant_id, lead.job.id)
    _end_companions(settings, [w for i, w in enumerate(works[1:], start=1) if i not in stopped], None)
    return {"model_id": model.id, "batches": n_batches, "streams": n_streams,
            "packed_jobs": [w.job.id for w in works[1:]]}


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
