"""Measured step timings (``step_timings``) and the estimates made from them.

Workers record what a unit of work took (``record``): one denoising step of one model batch, one
optimisation step of a training stage, one evaluation at a checkpoint. The API's dry runs and a
queued job's ``estimated_seconds`` read them back (``best``) and multiply by the units a job will
do. Keys are what the cost depends on and what both sides can compute without torch:

- sampling: the model id, the image size (``WxH`` pixels), the model batch, whether classifier-free
  guidance is on (diffusers concatenates the unconditional and conditional halves into one U-Net
  call of twice the batch, so a guided step does twice the U-Net work), and the device kind;
- training: a fingerprint of the parameters that shape a step (``train_keys``), the resolution,
  the batch size and the device kind.

The API does not know which worker, and so which device and batch size, will run a job: it takes
the device measured most recently for the key (the fleet as it is now) and, for sampling, the
batch measured most often there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import StepTiming, utcnow

DENOISE = "denoise"
TRAIN_STAGES = ("autoencoder", "unet")  # worker.model.training's stage names
KINDS = (DENOISE, *(f"train_{s}" for s in TRAIN_STAGES), *(f"eval_{s}" for s in TRAIN_STAGES))

# Weight of a new run's figure in the average. A run's figure is itself a mean over all its steps;
# 0.3 follows a change of hardware within about three runs (0.7^3 = 0.34 of the old figure left)
# while one cold run (first-step compilation, a page-cache miss: 2-3x slower on the 2-core VM)
# moves the estimate by a third of its excess, not all of it.
ALPHA = 0.3


def size_key(width: int, height: int) -> str:
    return f"{int(width)}x{int(height)}"


def _fingerprint(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return "train:" + hashlib.sha256(blob).hexdigest()[:24]


def train_keys(params) -> dict[str, str]:
    """``{kind: model_key}`` of a train job (``params``: ``shared.train_schema.TrainParams``): the
    fields that change what one step or one evaluation costs, hashed. Learning rates, seeds, the
    dataset and step counts change no step's cost and are left out, so that every job of one
    architecture shares its figures."""
    p = params
    ae = {"channels": p.autoencoder_channels, "latent": p.latent_channels, "precision": p.mixed_precision}
    unet = {"channels": p.unet_channels, "layers": p.layers_per_block, "heads": p.attention_heads,
            "text_time": p.text_time_embedding, "base": p.base_model, "latent": None if p.base_model else ae,
            "checkpointing": p.gradient_checkpointing, "cache_latents": p.cache_latents, "ema": p.ema,
            "precision": p.mixed_precision}
    evaluation = {"samples": p.eval_num_samples, "steps": p.eval_steps, "scheduler": p.eval_scheduler,
                  "guidance": p.eval_guidance_scale, "vlb": p.vlb_timesteps,
                  "prompts": len(p.validation_prompts or []), "holdout": p.holdout_fraction}
    return {"train_autoencoder": _fingerprint({"ae": ae}), "train_unet": _fingerprint({"unet": unet}),
            "eval_autoencoder": _fingerprint({"ae": ae, "eval": evaluation}),
            "eval_unet": _fingerprint({"unet": unet, "eval": evaluation})}


def record(session: Session, *, kind: str, model_key: str, size: str, batch: int, guidance: bool, device: str,
           seconds: float, units: int) -> None:
    """Fold one run's measurement (``seconds`` per unit, over ``units`` units) into the average."""
    if kind not in KINDS:
        raise ValueError(f"unknown timing kind {kind!r}; valid: {', '.join(KINDS)}")
    if units <= 0 or not seconds > 0:
        return
    key = dict(kind=kind, model_key=model_key, size=size, batch=int(batch), guidance=bool(guidance), device=device)
    row = session.get(StepTiming, tuple(key.values()), with_for_update=True)
    if row is None:
        session.add(StepTiming(**key, seconds=float(seconds), samples=int(units), updated_at=utcnow()))
        try:  # two workers recording the first figure at once: the loser folds into the winner's row
            with session.begin_nested():
                session.flush()
            return
        except IntegrityError:
            row = session.get(StepTiming, tuple(key.values()), with_for_update=True, populate_existing=True)
            if row is None:
                raise
    row.seconds = (1 - ALPHA) * row.seconds + ALPHA * float(seconds)
    row.samples += int(units)
    row.updated_at = utcnow()


@dataclass(frozen=True)
class Measured:
    seconds: float  # per unit
    batch: int
    guidance: bool
    device: str
    size: str
    samples: int
    updated_at: datetime


def measured(session: Session, kind: str, model_key: str, *, size: str | None = None,
             batch: int | None = None) -> list[Measured]:
    """Every figure of (kind, model_key[, size, batch]): one query (a key has a few rows: devices
    × batches × guidance)."""
    q = select(StepTiming).where(StepTiming.kind == kind, StepTiming.model_key == model_key)
    if size is not None:
        q = q.where(StepTiming.size == size)
    if batch is not None:
        q = q.where(StepTiming.batch == batch)
    return [Measured(r.seconds, r.batch, r.guidance, r.device, r.size, r.samples, r.updated_at)
            for r in session.scalars(q.limit(200))]


def pick(rows: list[Measured], *, guidance: bool | None = None, device: str | None = None, batch: int | None = None,
         size: str | None = None) -> Measured | None:
    """The figure to estimate with: among ``rows`` (narrowed by the arguments given), those of the
    device measured most recently, and of them the batch measured most often."""
    rows = [r for r in rows if (guidance is None or r.guidance == guidance) and (device is None or r.device == device)
            and (batch is None or r.batch == batch) and (size is None or r.size == size)]
    if not rows:
        return None
    latest = max(rows, key=lambda r: r.updated_at).device
    return max((r for r in rows if r.device == latest), key=lambda r: (r.samples, r.updated_at))


def best(session: Session, kind: str, model_key: str, *, size: str | None = None, batch: int | None = None,
         guidance: bool | None = None, device: str | None = None) -> Measured | None:
    """:func:`pick` over :func:`measured`."""
    return pick(measured(session, kind, model_key, size=size, batch=batch), guidance=guidance, device=device)
