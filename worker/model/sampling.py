"""Sampling at the speed of the model: fixed-size batches, cached text embeddings, model streams.

Pure torch and diffusers (no database, no storage): ``worker.jobs.sample`` decides what to make
and where it goes; this module makes it.

- Every image has its own seeded ``torch.Generator`` and is computed in a batch of a *fixed* size
  (the last batch is padded): a row of a batch does not depend on the other rows, and with the
  batch size fixed the kernels are the same, so each image is bit-identical to what it would be
  alone for its seed, whatever it is batched with (tests/worker/test_sampling.py proves it).
- On a CPU, two batches are computed side by side (:class:`ModelStreams`): a small model's kernels
  use two cores better as two single-threaded batches than as one batch split over both (tiny
  model on 2 cores: 48 → 70 images/s). Each stream has its own scheduler; results come back in order.
- Text embeddings of repeated prompts (and the empty negative prompt) are computed once
  (:class:`EmbeddingCache`).
- On a GPU the batch size can be found from free memory (:func:`auto_batch_size`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby

from shared.catalog import uses_guidance
from worker.model.ancestral import run_pipeline
from worker.model.img2img import TEXT, image_to_image_call, mode_of
from worker.model.pipelines import pipeline_view

log = logging.getLogger(__name__)


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
    # Image-to-image / inpainting (``worker.model.img2img``): input image ids and the strength.
    init_image: str | None = None
    strength: float | None = None
    mask_image: str | None = None

    @property
    def mode(self) -> str:
        return mode_of(self.init_image, self.mask_image)


def batch_key(it: Item) -> tuple:
    """What the items of one model batch share: steps and guidance, and the mode (text,
    image-to-image, inpainting) and strength (where the denoising starts)."""
    return it.steps, it.guidance_scale, it.mode, -1.0 if it.strength is None else it.strength


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Group items that share their :func:`batch_key` and cut them into model batches."""
    out: list[list[Item]] = []
    key = batch_key
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
             embeddings: EmbeddingCache, on_step=None, load_image=None):
    """One pipeline call for ``batch`` (items of one :func:`batch_key`) padded to ``batch_size``;
    returns float arrays (H, W, 3) in [0, 1]. ``load_image(item, image_id)``: the decoded input
    image (a ``PIL.Image``) of an image-to-image or inpainting item."""
    import torch

    padded = batch + [batch[-1]] * (batch_size - len(batch))
    generators = [torch.Generator(device).manual_seed(it.seed) for it in padded]
    cfg = uses_guidance(batch[0].guidance_scale)
    prompt_embeds = embeddings.get_many([it.prompt for it in padded])
    negative = embeddings.get_many([it.negative_prompt for it in padded]) if cfg else None

    call = run_pipeline  # the pipeline, or Algorithm 2 for ddpm
    images = {}
    if batch[0].mode != TEXT:  # from an init image (and a mask): the same parts, a loop of its own
        call = image_to_image_call
        images = {"strength": batch[0].strength,
                  "init_images": [load_image(it, it.init_image) for it in padded],
                  "mask_images": None if batch[0].mask_image is None else [load_image(it, it.mask_image) for it in padded]}
    with torch.inference_mode():
        out = call(
            pipe,
            **images,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=batch[0].steps,
            guidance_scale=batch[0].guidance_scale,
            generator=generators,
            width=width,
            height=height,
            output_type="np",
            callback_on_step_end=step_callback(generators, on_step),
            callback_on_step_end_tensor_inputs=STEP_TENSORS,
        )
    return out.images[: len(batch)]


# What the pipeline hands the step callback: the latents, and the (negative + positive, with
# guidance) prompt embeddings a corrector's network evaluation needs.
STEP_TENSORS = ["latents", "prompt_embeds"]


def step_callback(generator, on_step=None):
    """The pipeline's ``callback_on_step_end``: after each predictor step, the scheduler's corrector
    steps when it has them (its ``corrector_steps``; langevin-pc), then ``on_step(step)``.

    The corrector needs network evaluations of its own, and diffusers' pipeline loop has one per
    step; so they are made here, in the hook the pipeline calls after its step, with the same
    U-Net inputs and classifier-free guidance as the pipeline's own. ``generator`` is the
    pipeline's (one per image when a list): the corrector's noise is drawn from it, so an image
    stays a function of its seed. Use with ``callback_on_step_end_tensor_inputs=STEP_TENSORS``.
    """

    def callback(pipe, step, t, kwargs):
        scheduler = pipe.scheduler
        level = scheduler.corrector_timestep(t) if getattr(scheduler, "corrector_steps", 0) else None
        if level is not None:
            latents = kwargs["latents"]
            for _ in range(scheduler.corrector_steps):
                eps = guided_eps(pipe, latents, level, kwargs["prompt_embeds"])
                latents = scheduler.correct(eps, level, latents, generator=generator)
            kwargs["latents"] = latents
        if on_step is not None:
            on_step(step)
        return kwargs

    return callback


def guided_eps(pipe, latents, t: int, prompt_embeds):
    """ε_θ(latents, t) with the pipeline's classifier-free guidance, computed as its denoising loop
    computes it (diffusers' StableDiffusionPipeline.__call__)."""
    import torch

    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ValueError("a corrector cannot drive a U-Net with a guidance embedding (time_cond_proj_dim)")
    cfg = pipe.do_classifier_free_guidance
    model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
    eps = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=pipe.cross_attention_kwargs, return_dict=False)[0]
    if cfg:
        uncond, text = eps.chunk(2)
        eps = uncond + pipe.guidance_scale * (text - uncond)
        if pipe.guidance_rescale > 0.0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            eps = rescale_noise_cfg(eps, text, guidance_rescale=pipe.guidance_rescale)
    return eps


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
