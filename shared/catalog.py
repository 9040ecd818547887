"""Names that the API validates and the worker acts on, each listed once.

The API checks requests against these without importing the worker (or torch); the worker's
scheduler factory (``worker.model.schedulers``) and dataset loader (``worker.model.data``) build
exactly these, and refuse any other name listing the valid ones.
"""

from __future__ import annotations

from typing import Literal, get_args

# Samplers of a latent diffusion model: DDPM is the seed's Algorithm 2 (ancestral sampling, 1000
# steps by default); DDIM and DPM-Solver++ reach the same quality in 20-50 steps; langevin-pc adds
# Langevin corrector steps (Song et al. 2021) after each predictor step.
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++", "langevin-pc"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
DEFAULT_SCHEDULER: SchedulerName = "dpm-solver++"

# Langevin corrector steps M after each predictor step of "langevin-pc" but the last (which lands on
# clean data, where there is no score to follow): a job of `steps` costs steps + M·(steps − 1)
# network evaluations (see network_evaluations). M = 1, the cheapest corrector (docs/benchmarks.md,
# "Langevin corrector", measures it; larger M was not).
LANGEVIN_CORRECTOR_STEPS = 1

# One line for each accepted name (GET /v1/schedulers lists them).
SCHEDULER_DESCRIPTIONS: dict[str, str] = {
    "ddpm": "DDPM ancestral sampling (Ho et al. 2020, Algorithm 2); 1 network evaluation a step, "
            "best at hundreds of steps (1000 is the paper's).",
    "ddim": "DDIM (Song et al. 2021), deterministic; 1 network evaluation a step, good at 20-50 steps.",
    "dpm-solver++": "DPM-Solver++ (Lu et al. 2022), 2nd-order multistep; 1 network evaluation a step, "
                    "good at 10-25 steps (the default).",
    "langevin-pc": f"Predictor-corrector (Song et al. 2021): DDIM steps, each followed by {LANGEVIN_CORRECTOR_STEPS} "
                   f"Langevin step(s) on the score; a step costs {1 + LANGEVIN_CORRECTOR_STEPS} network evaluations "
                   f"(the last 1).",
}
if set(SCHEDULER_DESCRIPTIONS) != set(SCHEDULERS):  # each name has its line; checked on import
    raise RuntimeError("SCHEDULER_DESCRIPTIONS must describe exactly the SCHEDULERS")


def network_evaluations(scheduler: str, steps: int) -> int:
    """The U-Net passes (of the guided batch) that ``steps`` steps of ``scheduler`` cost: ``steps``,
    and for langevin-pc ``steps`` predictor evaluations plus M corrector evaluations after every
    predictor step but the last."""
    if scheduler == "langevin-pc":
        return steps + LANGEVIN_CORRECTOR_STEPS * max(steps - 1, 0)
    return steps

# Datasets that ship with the worker (no upload): scikit-learn's 1,797 handwritten 8×8 digits.
BUILTIN_DATASETS: tuple[str, ...] = ("builtin:digits",)

# Job priority (spec 1.1 "Scheduling"): within one tenant higher runs first, FIFO among equals.
PRIORITY_MIN, PRIORITY_MAX = -10, 10
PRIORITY_HELP = f"{PRIORITY_MIN}..{PRIORITY_MAX}: within the tenant, higher runs first (FIFO among equals)"

# What a sample job writes: a PNG per image, or WebDataset tar shards (``<key>.png`` + ``<key>.json``
# per image, a fixed number of images a shard: ``LDMQ_WDS_SHARD_IMAGES``), for dataset builders.
OutputFormat = Literal["png", "webdataset"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
DEFAULT_OUTPUT_FORMAT: OutputFormat = "png"

# Aging (spec 1.1 "Scheduling"): seconds of waiting worth one priority level (LDMQ_SCHED_AGING_S).
# 300 s: a priority-10 job is ahead of a priority-0 job submitted up to 50 minutes before it, and
# no job waits behind later work for longer than that.
SCHED_AGING_S_DEFAULT = 300.0


def uses_guidance(guidance_scale: float) -> bool:
    """Whether sampling at this scale runs classifier-free guidance. At 1 the guided prediction is
    the conditional one, so diffusers skips the unconditional half; above 1 it concatenates both
    halves into one U-Net call of twice the batch: twice the U-Net work per step."""
    return guidance_scale > 1

# Image-to-image and inpainting (a prompt's init_image, strength, mask_image): the strength a row
# with an init image uses when it states none. strength s starts the sampler at t ≈ s·T from
# q(x_t | x_0) of the init image and runs ⌊s·steps⌋ of its steps (docs/model.md); 0.8 is diffusers'
# StableDiffusionImg2ImgPipeline default: most of the layout kept, the details redrawn.
DEFAULT_STRENGTH = 0.8


def denoising_steps(steps: int, strength: float | None) -> int:
    """The sampler steps an image runs: all of ``steps`` from noise (``strength`` None), the last
    ⌊strength · steps⌋ from an init image. The worker runs that many, the submit refuses 0 and the
    estimates count them."""
    return steps if strength is None else min(int(steps * strength), steps)
