"""Names that the API validates and the worker acts on, each listed once.

The API checks requests against these without importing the worker (or torch); the worker's
scheduler factory (``worker.model.schedulers``) and dataset loader (``worker.model.data``) build
exactly these, and refuse any other name listing the valid ones.
"""

from __future__ import annotations

from typing import Literal, get_args

# Samplers of a latent diffusion model: DDPM is the seed's Algorithm 2 (ancestral sampling, 1000
# steps by default); DDIM and DPM-Solver++ reach the same quality in 20-50 steps.
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
DEFAULT_SCHEDULER: SchedulerName = "dpm-solver++"

# Datasets that ship with the worker (no upload): scikit-learn's 1,797 handwritten 8×8 digits.
BUILTIN_DATASETS: tuple[str, ...] = ("builtin:digits",)


def uses_guidance(guidance_scale: float) -> bool:
    """Whether sampling at this scale runs classifier-free guidance. At 1 the guided prediction is
    the conditional one, so diffusers skips the unconditional half; above 1 it concatenates both
    halves into one U-Net call of twice the batch: twice the U-Net work per step."""
    return guidance_scale > 1
