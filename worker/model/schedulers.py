"""The one scheduler factory: the noise schedule a model is trained with, and the samplers built
from it. Sampling jobs, evaluation, benchmarks and the tiny test pipeline all come here, so that
what evaluation measures is what a job samples.

diffusers' schedulers are the math (``set_timesteps`` / ``step`` / ``add_noise``); these functions
only choose their configuration. The one exception is langevin-pc's corrector, which diffusers
lacks for DDPM models (:mod:`worker.model.langevin`, written by hand around diffusers' DDIM).
"""

from __future__ import annotations

from shared.catalog import LANGEVIN_CORRECTOR_STEPS, SCHEDULERS

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def noise_scheduler_config() -> dict:
    """The training process of every model ldmq builds: DDPM (Ho et al. 2020), linear β 1e-4..0.02,
    T = 1000, ε-prediction, ``clip_sample=False`` (a sampler built from this config inherits it)."""
    return dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
        variance_type="fixed_small",
        # Every sampler starts at t = T−1 (Lin et al. 2024); with "trailing" spacing steps_offset is
        # unused, and 1 keeps StableDiffusionPipeline from rewriting the config with a deprecation.
        timestep_spacing="trailing",
        steps_offset=1,
    )


def make_noise_scheduler():
    """What a saved pipeline samples with by default: DDPM (Algorithm 2) on :func:`noise_scheduler_config`."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_scheduler_config())


def make_scheduler_like(scheduler):
    """A DDPMScheduler with a base model's training schedule (its config may belong to another
    class), ``clip_sample`` off."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, clip_sample=False)


def make_scheduler(name: str, base_config):
    """A sampler (one of ``shared.catalog.SCHEDULERS``) on a model's training schedule.

    DDPM is Algorithm 2; DDIM and DPM-Solver++ are faster. ``clip_sample`` is forced off: DDIM
    built from a DDPM config inherits ``clip_sample=True``, and clipping the predicted latent x_0 to
    [−1, 1] wrecks guided latent samples (pixel-space digits: accuracy 0.96 → 0.16, measured).
    DDIM's last step lands on ᾱ_0 (``set_alpha_to_one=False``, as Stable Diffusion ships it), not on
    ᾱ = 1. langevin-pc is DDIM with ``LANGEVIN_CORRECTOR_STEPS`` Langevin corrector steps after
    each predictor step (its network evaluations are made by the sampling loop).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(base_config, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "langevin-pc":
        from worker.model.langevin import LangevinPCScheduler

        return LangevinPCScheduler.from_config(base_config, corrector_steps=LANGEVIN_CORRECTOR_STEPS)
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
