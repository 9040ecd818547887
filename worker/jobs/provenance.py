"""What makes an image again: the parameters each PNG and the manifest record.

Every image records the model (id and content hash), the sampler, steps, guidance, prompt,
negative prompt, seed, size, its input images and strength when it was made from an init image, the dtype and kind of device it was computed on, and the torch,
diffusers and ldmq versions. Each PNG carries them in two text chunks:

- ``parameters``: the line format image tools read (AUTOMATIC1111's): the prompt, a
  ``Negative prompt: …`` line, then ``Steps: N, Sampler: X, CFG scale: G, Seed: S, Size: WxH,
  Model hash: …, Model: <id>``;
- ``ldmq``: the exact JSON (``ldmq jobs reproduce PNG`` reads it to submit the image again).

The text is built here, in the executor (a string per image); the writer process only adds it to
the PNG, so the pixels are the same as without it.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

from shared.db import session_scope
from shared.models import Model
from shared.registry import CONFIG_SHA256
from shared.settings import Settings
from shared.storage import get_storage
from worker.model.sampling import Item

log = logging.getLogger(__name__)

PNG_PARAMETERS, PNG_LDMQ = "parameters", "ldmq"
# The names image tools use for our samplers (DPM-Solver++ of order 2 is their "DPM++ 2M").
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm-solver++": "DPM++ 2M"}


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The torch, diffusers and ldmq versions of this worker."""
    from importlib.metadata import PackageNotFoundError, version

    import diffusers
    import torch

    try:
        ldmq = version("ldmq")
    except PackageNotFoundError:
        ldmq = "unknown"
    return {"torch": str(torch.__version__), "diffusers": str(diffusers.__version__), "ldmq": ldmq}


def model_sha256(settings: Settings, model: Model) -> str:
    """The model's content hash: kept in its config since it was stored; for a model that predates
    it, computed from its stored files now and kept there for the next run."""
    known = (model.config or {}).get(CONFIG_SHA256)
    if known:
        return known
    digest = get_storage(settings).prefix_sha256(model.key)
    with session_scope(settings) as s:
        row = s.get(Model, model.id, with_for_update=True)
        if row is not None:
            row.config = {**(row.config or {}), CONFIG_SHA256: digest}
    log.info("model %s: content hash computed and kept: %s", model.id, digest)
    return digest


def run_params(settings: Settings, model: Model, *, scheduler: str, pipe, device: str) -> dict[str, Any]:
    """What every image of a run shares: model id and hash, sampler, dtype, device kind, versions."""
    return {"model_id": model.id, "model_sha256": model_sha256(settings, model), "scheduler": scheduler,
            "dtype": str(pipe.unet.dtype).removeprefix("torch."), "device": device.split(":", 1)[0],
            "versions": versions()}


def row_steps_guidance(job_params: dict[str, Any], row) -> tuple[int, float]:
    """A row's steps and guidance: its own, else the job's."""
    return (row.steps if row.steps is not None else job_params["steps"],
            row.guidance_scale if row.guidance_scale is not None else job_params["guidance_scale"])


# A row's image-to-image / inpainting fields, recorded only when it has an init image (a text
# image's record stays as it was).
IMAGE_FIELDS = ("init_image", "strength", "mask_image")


def row_image_fields(row) -> dict[str, Any]:
    """``init_image``, ``strength`` and ``mask_image`` of a row (or an Item) that starts from an init image, else {}."""
    return {} if row.init_image is None else {f: getattr(row, f) for f in IMAGE_FIELDS}


def image_params(run: dict[str, Any], job_id: str, item: Item, width: int, height: int) -> dict[str, Any]:
    """Everything about one image (the ``ldmq`` chunk's JSON)."""
    return {"job_id": job_id, "row": item.row, "index": item.index, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt, "seed": item.seed, "steps": item.steps,
            "guidance_scale": item.guidance_scale, "width": width, "height": height, **row_image_fields(item), **run}


def parameters_text(p: dict[str, Any]) -> str:
    """The AUTOMATIC1111-style ``parameters`` text (its model hash: the first 10 hex digits)."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    sampler = SAMPLER_NAMES.get(p["scheduler"], p["scheduler"])
    lines.append(f"Steps: {p['steps']}, Sampler: {sampler}, CFG scale: {p['guidance_scale']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model hash: {p['model_sha256'][:10]}, Model: {p['model_id']}, "
                 f"Version: ldmq {p['versions']['ldmq']}")
    if p.get("init_image"):  # A1111's name for it; the ids are ldmq's own
        lines[-1] += f", Denoising strength: {p['strength']:g}, Init image: {p['init_image']}"
        if p.get("mask_image"):
            lines[-1] += f", Mask image: {p['mask_image']}"
    return "\n".join(lines)


def png_text(p: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks of one image (keyword → text)."""
    return {PNG_PARAMETERS: parameters_text(p), PNG_LDMQ: json.dumps(p, sort_keys=True)}
