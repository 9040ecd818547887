"""Predictor–corrector sampling with a Langevin corrector (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", §4.2 and Algorithm 5, "Corrector algorithm (VP)").

diffusers has predictors for ε-models (DDPM, DDIM, DPM-Solver++, …) but no Langevin corrector for
a VP/DDPM model (its ``ScoreSdeVeScheduler`` has ``step_correct`` only for the VE SDE, on σ-models),
so the corrector step is written here by hand; the predictor step is diffusers' own scheduler.

The corrector follows the score of the noised data at the sample's noise level, which an
ε-model gives (docs/model.md, "Relation to Langevin dynamics"):

    s_θ(x_t, t) = ∇_x log q(x_t) ≈ −ε_θ(x_t, t) / √(1 − ᾱ_t)

and one corrector step is, with z ~ N(0, I) and the signal-to-noise ratio r:

    δ = 2 α_t (r ‖z‖ / ‖s_θ‖)²,   x ← x + δ s_θ + √(2δ) z

(α_t = 1 − β_t of the training schedule at level t). The norms are taken per image: the paper's
reference code averages them over the batch, which would make an image depend on its batch mates,
and ldmq promises each image its seed's pixels whatever it is batched with.

The model is not called here: a corrector step needs its own network evaluation(s), which only
the sampling loop can make (prompt embeddings, guidance). The loop sees the capability
``corrector_steps`` and, after each predictor step, asks :meth:`LangevinPCScheduler.corrector_timestep`
for the level the sample is at and calls :meth:`LangevinPCScheduler.correct` with the guided ε
(``worker.model.sampling.step_callback``).
"""

from __future__ import annotations

import torch

PREDICTORS = ("ddim", "ddpm")
# Song et al. 2021 used r = 0.16 for VP models on CIFAR-10 (N = 1000 steps). Kept: on the digits,
# r = 0.08..0.32 moved the Fréchet ratio less than chance (1.84-1.95× at 19 evaluations) and only
# raised accuracy with r (0.970 -> 0.995); docs/benchmarks.md, "Langevin corrector".
DEFAULT_SNR = 0.16


class LangevinPCScheduler:
    """A diffusers-style scheduler (``set_timesteps`` / ``step`` / ``add_noise``, same call pattern
    as the others) whose ``step`` is the predictor's (diffusers' DDIM or DDPM) and which adds the
    Langevin corrector (:meth:`correct`, ``corrector_steps`` times after each predictor step but
    the last, which lands on clean data where there is no score)."""

    def __init__(self, predictor, *, corrector_steps: int, snr: float = DEFAULT_SNR):
        if corrector_steps < 1:
            raise ValueError(f"corrector_steps must be at least 1; got {corrector_steps}")
        if not snr > 0:
            raise ValueError(f"snr must be positive; got {snr}")
        self.predictor = predictor
        self.corrector_steps = corrector_steps
        self.snr = float(snr)

    @classmethod
    def from_config(cls, config, *, predictor: str = "ddim", corrector_steps: int, snr: float = DEFAULT_SNR):
        """On a model's training schedule ``config``, with predictor ``"ddim"`` (deterministic, the
        default) or ``"ddpm"`` (ancestral, Algorithm 2). DDIM because at 19 network evaluations on
        the digits it gave 1.85× the Fréchet floor against 3.22× with DDPM's ancestral steps
        (docs/benchmarks.md). ``clip_sample`` is off, as for the plain samplers."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if predictor == "ddim":
            inner = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
        elif predictor == "ddpm":
            inner = DDPMScheduler.from_config(config, clip_sample=False)
        else:
            raise ValueError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
        return cls(inner, corrector_steps=corrector_steps, snr=snr)

    # What a pipeline reads of a scheduler, from the predictor.
    @property
    def config(self):
        return self.predictor.config

    @property
    def timesteps(self) -> torch.Tensor:
        return self.predictor.timesteps

    @property
    def order(self) -> int:
        return self.predictor.order

    @property
    def init_noise_sigma(self) -> float:
        return self.predictor.init_noise_sigma

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.predictor.alphas_cumprod

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.predictor.set_timesteps(num_inference_steps, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return self.predictor.scale_model_input(sample, timestep)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.predictor.add_noise(original_samples, noise, timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """The predictor's step x_t → x_{t'} (DDIM with η = 0, or DDPM's ancestral step drawing from ``generator``)."""
        if "generator" in _step_parameters(self.predictor):
            return self.predictor.step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return self.predictor.step(model_output, timestep, sample, return_dict=return_dict)

    def corrector_timestep(self, timestep) -> int | None:
        """The level the predictor's step from ``timestep`` lands on, where the corrector runs;
        None after the last step (clean data: ᾱ → 1, no score to follow)."""
        t = int(timestep)
        if hasattr(self.predictor, "previous_timestep"):  # DDPM: the next of its timesteps
            prev = int(self.predictor.previous_timestep(t))
        else:  # DDIM's own rule (DDIMScheduler.step)
            prev = t - self.config.num_train_timesteps // self.predictor.num_inference_steps
        return prev if prev >= 0 else None

    def correct(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator=None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """One Langevin corrector step (Algorithm 5, VP) of ``sample`` at level ``timestep``, given
        ``model_output`` = ε_θ(sample, timestep) (guided, with classifier-free guidance) and
        z = ``noise`` or a draw from ``generator`` (one per image when a list)."""
        from diffusers.utils.torch_utils import randn_tensor

        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        t = int(timestep)
        alpha_bar = self.alphas_cumprod[t].item()
        alpha = 1.0 - self.predictor.betas[t].item()
        x, z = sample.float(), noise.float()
        score = -model_output.float() / (1.0 - alpha_bar) ** 0.5
        z_norm = z.flatten(1).norm(dim=1)
        s_norm = score.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        step = 2.0 * alpha * (self.snr * z_norm / s_norm) ** 2
        step = step.reshape(-1, *([1] * (x.ndim - 1)))
        return (x + step * score + (2.0 * step).sqrt() * z).to(sample.dtype)


def _step_parameters(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
