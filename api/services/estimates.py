"""GPU-seconds a job will take: from the timings workers measured (``shared.estimates``) when there
are some for the job's key, else from a per-model constant or ``LDMQ_ESTIMATE_SECONDS_PER_STEP``.

Every estimate says where its figures came from (``source``: ``measured``, ``model`` or
``default``), so a client can weigh it. What it counts:

- sampling: per group of images sharing (steps, guidance scale), as the worker packs them, the
  model batches it takes (the last one padded: a full batch's cost) × steps × the measured seconds
  of one batch-step at that guidance. Guidance above 1 doubles the U-Net's batch (diffusers runs the
  unconditional and conditional halves as one call); when only the other kind of step was measured
  the figure is scaled by 2 (or 1/2) and the source says ``measured, scaled for guidance``.
  Without a measurement: image-steps × seconds per image-step, guided image-steps counted twice.
- training: autoencoder steps × its step, U-Net steps × its step, and each evaluation at a
  checkpoint (how many follows from ``checkpoint_every`` and ``eval_at_checkpoints``). Without a
  measurement a step of batch B is taken as 3·B U-Net image-steps (forward and backward) and an
  evaluation as its samples × steps (× 2 when guided).

Not counted: loading the pipeline, writing PNGs and checkpoints, queueing. ``ldmq bench estimate``
prints the error against a real run.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas import SampleRequest, TrainEstimate
from shared import estimates
from shared.catalog import denoising_steps, network_evaluations, uses_guidance
from shared.models import Job, JobRow, JobType, Model
from shared.sampling_defaults import GLOBAL_DEFAULTS
from shared.train_schema import TrainParams

# A rough default: one U-Net step of a small latent-diffusion model at 512 px on a current GPU.
DEFAULT_SECONDS_PER_STEP = 0.05
SECONDS_PER_STEP_ENV = "LDMQ_ESTIMATE_SECONDS_PER_STEP"
# A training step is a forward and a backward pass: about 3 forward passes' work.
TRAIN_STEP_FACTOR = 3


def default_seconds_per_step() -> float:
    raw = os.environ.get(SECONDS_PER_STEP_ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS_PER_STEP
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SECONDS_PER_STEP_ENV}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{SECONDS_PER_STEP_ENV} must be positive; got {raw!r}")
    return value


def model_seconds_per_step(model: Model | None) -> tuple[float, str]:
    """(seconds per unguided U-Net image-step, source): the model's ``config.seconds_per_step`` when
    it holds a positive number, else the default (``LDMQ_ESTIMATE_SECONDS_PER_STEP``)."""
    value = ((model.config if model is not None else None) or {}).get("seconds_per_step")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value), "model"
    return default_seconds_per_step(), "default"


def default_size(model: Model) -> int | None:
    """The side a model samples at when a job names none: its training resolution, if ldmq trained it."""
    res = ((model.config or {}).get("train_params") or {}).get("resolution")
    return res if isinstance(res, int) and res > 0 else None


def sample_size(model: Model, width: int | None, height: int | None) -> str | None:
    side = default_size(model)
    w, h = width or side, height or side
    return estimates.size_key(w, h) if w and h else None


def sample_seconds(session: Session, model: Model, groups: Counter, size: str | None) -> dict[str, Any]:
    """The estimate of sampling ``groups`` ({(steps, guidance_scale): images}) from ``model`` at
    ``size`` (``WxH``; None: whatever size was measured): ``seconds``, ``source``,
    ``seconds_per_step`` (per unguided image-step), ``unet_steps`` (image-steps, guided twice) and
    the ``measurement`` used (device, batch, size, samples), or None."""
    unet_steps = sum(n * steps * (2 if uses_guidance(g) else 1) for (steps, g), n in groups.items())
    rows = estimates.measured(session, estimates.DENOISE, model.id, size=size)
    found = estimates.pick(rows)
    if found is None:
        sps, source = model_seconds_per_step(model)
        return {"seconds": unet_steps * sps, "source": source, "seconds_per_step": sps, "unet_steps": unet_steps,
                "measurement": None}
    per_flag: dict[bool, float] = {}
    for flag in (False, True):
        m = estimates.pick(rows, guidance=flag, device=found.device, batch=found.batch, size=found.size)
        if m is not None:
            per_flag[flag] = m.seconds
    scaled = False
    seconds = 0.0
    for (steps, g), n in groups.items():
        flag = uses_guidance(g)
        t = per_flag.get(flag)
        if t is None:  # only the other kind measured: guidance doubles the U-Net batch
            t = per_flag[not flag] * (2.0 if flag else 0.5)
            scaled = True
        seconds += math.ceil(n / found.batch) * steps * t
    unguided = per_flag.get(False, per_flag.get(True, 0.0) / 2)
    return {"seconds": seconds, "source": "measured, scaled for guidance" if scaled else "measured",
            "seconds_per_step": unguided / found.batch, "unet_steps": unet_steps,
            "measurement": {"device": found.device, "batch_size": found.batch, "size": found.size,
                            "samples": found.samples}}


def sample_groups(req: SampleRequest, used: dict[str, Any]) -> Counter:
    """{(network evaluations, guidance_scale): images} of a request whose job-wide scheduler, steps
    and guidance resolved to ``used`` (the request's, else the model's defaults); a row's own steps
    and guidance win; a row from an init image runs ⌊strength · steps⌋ of them. langevin-pc's
    corrector evaluations count as steps (each is a U-Net pass)."""
    groups: Counter = Counter()
    for p in req.prompts:
        steps = denoising_steps(p.steps if p.steps is not None else used["steps"], p.used_strength())
        g = p.guidance_scale if p.guidance_scale is not None else used["guidance_scale"]
        groups[(network_evaluations(used["scheduler"], steps), g)] += p.num_images
    return groups


def _evaluations(first: int, steps: int, every: int, at_checkpoints: bool) -> int:
    """Evaluations of a stage of ``steps`` steps after global step ``first``: one at each checkpoint
    (every ``every`` global steps, and the stage's last) with ``at_checkpoints``, else the last only."""
    if not at_checkpoints:
        return 1
    last = first + steps
    n = last // every - first // every
    return n + (0 if last % every == 0 else 1)


def train_estimate(session: Session, params: TrainParams) -> TrainEstimate:
    """The estimate of a train job with ``params`` (the parts, each with its source)."""
    keys = estimates.train_keys(params)
    size = estimates.size_key(params.resolution, params.resolution)
    sps, default_source = model_seconds_per_step(None)
    ae_steps = 0 if params.base_model else params.autoencoder_steps
    stages = [("autoencoder", ae_steps, 0), ("unet", params.steps, ae_steps)] if ae_steps else [("unet", params.steps, 0)]
    eval_default = params.eval_num_samples * params.eval_steps * (2 if uses_guidance(params.eval_guidance_scale) else 1) * sps
    parts, total, sources = [], 0.0, set()
    for stage, steps, first in stages:
        n_eval = _evaluations(first, steps, params.checkpoint_every, params.eval_at_checkpoints)
        for kind, units, fallback in ((f"train_{stage}", steps, TRAIN_STEP_FACTOR * params.batch_size * sps),
                                      (f"eval_{stage}", n_eval, eval_default)):
            m = estimates.best(session, kind, keys[kind], size=size, batch=params.batch_size)
            each, source = (m.seconds, "measured") if m is not None else (fallback, default_source)
            sources.add(source)
            total += units * each
            parts.append({"kind": kind, "units": units, "seconds_each": round(each, 6), "source": source,
                          "device": m.device if m is not None else None})
    source = sources.pop() if len(sources) == 1 else "partly measured"
    return TrainEstimate(dataset=params.dataset, total_steps=params.total_steps, estimated_gpu_seconds=round(total, 3),
                         source=source, parts=parts)


def job_estimated_seconds(session: Session, job: Job) -> float | None:
    """GPU-seconds of the work a job still has to do (its own: not the jobs ahead of it), as a dry
    run of its request would estimate them; a job that is final has none (None). For a job that
    ran before (requeued), the part its progress says is done is taken off."""
    if job.status not in ("queued", "running"):
        return None
    left = max(0.0, 1.0 - float(job.progress or 0.0))
    if job.type == JobType.train.value:
        try:
            params = TrainParams.model_validate(job.params)
        except ValidationError:  # a job recorded under an older schema: no estimate, never a 500
            return None
        return round(train_estimate(session, params).estimated_gpu_seconds * left, 3)
    model = session.get(Model, job.model_id) if job.model_id else None
    if model is None:
        return None
    groups: Counter = Counter()
    rows = session.execute(select(JobRow.steps, JobRow.guidance_scale, JobRow.strength, func.sum(JobRow.num_images))
                           .where(JobRow.job_id == job.id)
                           .group_by(JobRow.steps, JobRow.guidance_scale, JobRow.strength))
    used = {f: job.params.get(f, GLOBAL_DEFAULTS[f]) for f in ("scheduler", "steps", "guidance_scale")}
    for steps, g, strength, n in rows:  # one row per (steps, guidance, strength) override: a few, however long the CSV
        steps = denoising_steps(steps if steps is not None else used["steps"], strength)
        groups[(network_evaluations(used["scheduler"], steps),
                g if g is not None else used["guidance_scale"])] += int(n)
    size = sample_size(model, job.params.get("width"), job.params.get("height"))
    return round(sample_seconds(session, model, groups, size)["seconds"] * left, 3)
