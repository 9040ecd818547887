"""DDPM math (Ho et al. 2020), one small function per equation; pure tensors, no I/O.

Notation follows ``/work/shared/spec/model.md``. Style after openai/improved-diffusion's
``gaussian_diffusion.py``: every coefficient is computed once, in float64 numpy, by
:class:`GaussianDiffusion`, and read out per timestep with :func:`extract`.

Timestep convention (as diffusers and improved-diffusion): ``t`` is a 0-based index in
``0 .. T-1`` and index ``t`` holds the paper's step ``t + 1``. So ``alphas_cumprod[t]`` is
ᾱ_{t+1}, ``t == 0`` is the last denoising step (the decoder term L_0) and ``t == T-1`` is x_T.

Shapes: ``x_start``, ``x_t``, ``noise`` and ``eps`` are (B, ...) with any trailing dims
(images (B, C, H, W), latents, or plain vectors); ``t`` is a LongTensor (B,). Per-example
results (losses, KLs, bits/dim) are (B,): the mean over all non-batch dims.

The seed's two algorithms are named here, and the rest of ldmq calls them:
- Algorithm 1 (training), :func:`train_step`: t ~ U, ε ~ N(0, I), x_t by :meth:`GaussianDiffusion.q_sample`,
  L_simple, one gradient step. The U-Net stage of ``worker.model.training`` takes every step through it.
- Algorithm 2 (ancestral sampling), :meth:`GaussianDiffusion.ancestral_sample`: the whole loop from
  x_T ~ N(0, I) to x_0 with the ε-parameterised mean μ_θ and σ_t² = β̃_t or β_t. The ``ddpm`` sampler of
  sampling jobs and of evaluation runs it (``worker.model.ancestral``); tests check it step by step
  against diffusers' ``DDPMScheduler`` loop with the same noise.

What comes from diffusers and what is written here:
- DDIM and DPM-Solver++ are diffusers' schedulers; this module does not reimplement them.
- Algorithm 2 is written here (rather than driving ``DDPMScheduler.step``) so that the sampler a job
  runs is the seed's equation line by line; it is the same process as diffusers' to float rounding.
- Diffusers has no variational bound: the VLB terms L_T, L_{t-1}, L_0, the Gaussian KL, the
  discretised Gaussian log-likelihood and bits/dim are written by hand here (after
  improved-diffusion ``losses.py`` / ``gaussian_diffusion.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
# diffusers' name for each of our schedule names (DDPMScheduler(beta_schedule=...)).
DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
VARIANCE_TYPES = ("fixed_small", "fixed_large")


# --------------------------------------------------------------------------------------------
# Variance schedules β_1 < … < β_T
# --------------------------------------------------------------------------------------------


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM (Ho et al. 2020, §4): β_t linear from ``beta_start`` to ``beta_end``. Returns (T,) float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_beta_schedule(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """LDM / Stable Diffusion: √β_t linear, then squared (diffusers' ``scaled_linear``). (T,) float64."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1),
    clipped at ``max_beta`` (diffusers' ``squaredcos_cap_v2``). (T,) float64."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(
    name: str, num_timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """β schedule by name (one of :data:`BETA_SCHEDULES`); raises ValueError listing the valid names."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps, beta_start or 1e-4, beta_end or 0.02)
    if name == "scaled_linear":
        return scaled_linear_beta_schedule(num_timesteps, beta_start or 0.00085, beta_end or 0.012)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(BETA_SCHEDULES)}")


def betas_from_scheduler_config(config) -> np.ndarray:
    """β (T,) float64 for a diffusers scheduler config (``beta_schedule``, ``beta_start``, …).

    Raises ValueError for a schedule this module does not implement (or ``trained_betas``), listing
    the supported diffusers names.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("trained_betas") is not None:
        return np.asarray(get("trained_betas"), dtype=np.float64)
    by_diffusers_name = {v: k for k, v in DIFFUSERS_BETA_SCHEDULE.items()}
    name = get("beta_schedule", "linear")
    if name not in by_diffusers_name:
        raise ValueError(
            f"scheduler beta_schedule {name!r} is not supported; valid: {', '.join(by_diffusers_name)}"
        )
    return get_named_beta_schedule(
        by_diffusers_name[name], int(get("num_train_timesteps", 1000)), get("beta_start"), get("beta_end")
    )


# --------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------


def posterior_variance_beta_tilde(betas, alphas_cumprod, alphas_cumprod_prev) -> np.ndarray:
    """β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, the variance of q(x_{t−1} | x_t, x_0). (T,) float64."""
    return betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)


def posterior_mean_coefficients(betas, alphas_cumprod, alphas_cumprod_prev) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (of x_0, of x_t) in μ̃_t(x_t, x_0) = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x_0
    + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t. Each (T,) float64."""
    alphas = 1.0 - betas
    coef_x0 = np.sqrt(alphas_cumprod_prev) * betas / (1.0 - alphas_cumprod)
    coef_xt = np.sqrt(alphas) * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return coef_x0, coef_xt


def extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``arr[t]`` as a tensor of ``like``'s dtype/device, shaped (B, 1, …, 1) to broadcast against ``like``."""
    out = torch.from_numpy(arr).to(device=t.device)[t].to(dtype=like.dtype, device=like.device)
    return out.reshape(out.shape + (1,) * (like.ndim - 1))


@dataclass(frozen=True)
class GaussianDiffusion:
    """All coefficients of the forward and reverse processes, computed once in float64.

    Construct with :meth:`from_betas` (or :meth:`linear` for DDPM's schedule). Arrays are (T,).
    """

    betas: np.ndarray
    alphas: np.ndarray  # α_t = 1 − β_t
    alphas_cumprod: np.ndarray  # ᾱ_t = ∏_{i≤t} α_i
    alphas_cumprod_prev: np.ndarray  # ᾱ_{t−1}, with ᾱ_0 := 1
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray  # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: np.ndarray  # √(1/ᾱ_t − 1)
    posterior_variance: np.ndarray  # β̃_t
    posterior_log_variance_clipped: np.ndarray  # log β̃_t, with β̃ at index 0 replaced by index 1's
    posterior_mean_coef1: np.ndarray  # coefficient of x_0 in μ̃_t
    posterior_mean_coef2: np.ndarray  # coefficient of x_t in μ̃_t
    eps_coef: np.ndarray  # β_t / √(1 − ᾱ_t), the coefficient of ε in μ_θ
    sqrt_recip_alphas: np.ndarray  # 1/√α_t

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas) -> "GaussianDiffusion":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with every value in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = posterior_variance_beta_tilde(betas, alphas_cumprod, alphas_cumprod_prev)
        coef1, coef2 = posterior_mean_coefficients(betas, alphas_cumprod, alphas_cumprod_prev)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            # β̃ at index 0 is 0 (x_0 is known exactly given x_1 and x_0); its log is clipped, as in
            # improved-diffusion, so that the decoder p(x_0|x_1) has variance β̃ of the next step.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(betas) > 1
            else np.log(betas),
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
            eps_coef=betas / np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas=1.0 / np.sqrt(alphas),
        )

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """DDPM's schedule: T = 1000, β linear from 1e-4 to 0.02."""
        return cls.from_betas(linear_beta_schedule(num_timesteps, beta_start, beta_end))

    @classmethod
    def from_scheduler_config(cls, config) -> "GaussianDiffusion":
        """The same process as a diffusers scheduler config describes (see :func:`betas_from_scheduler_config`)."""
        return cls.from_betas(betas_from_scheduler_config(config))

    # ---- forward process ------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (closed form). Returns (mean, variance, log_variance)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (reparameterised closed form of q(x_t | x_0))."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One forward step, q(x_t | x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t I)."""
        return extract(np.sqrt(1.0 - self.betas), t, x_prev) * x_prev + extract(np.sqrt(self.betas), t, x_prev) * noise

    # ---- posterior q(x_{t-1} | x_t, x_0) ----------------------------------------------------

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I). Returns (μ̃, β̃, log β̃ clipped), each like x_t.

        μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t.
        """
        mean = extract(self.posterior_mean_coef1, t, x_t) * x_start + extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- reverse process p_θ(x_{t-1} | x_t), ε-parameterised ---------------------------------

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t  (inverse of q_sample)."""
        return extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """μ_θ(x_t, t) = (x_t − β_t / √(1 − ᾱ_t) · ε_θ(x_t, t)) / √α_t  (DDPM eq. 11)."""
        return extract(self.sqrt_recip_alphas, t, x_t) * (x_t - extract(self.eps_coef, t, x_t) * eps)

    def p_variance(self, t: torch.Tensor, like: torch.Tensor, variance_type: str = "fixed_small"):
        """Σ_θ = σ_t² I, fixed: β̃_t (``fixed_small``) or β_t (``fixed_large``; index 0 uses β̃_1 as in
        improved-diffusion). Returns (variance, log_variance), each like ``like``."""
        if variance_type == "fixed_small":
            log_var = self.posterior_log_variance_clipped
        elif variance_type == "fixed_large":
            log_var = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        else:
            raise ValueError(f"unknown variance_type {variance_type!r}; valid: {', '.join(VARIANCE_TYPES)}")
        log_variance = extract(log_var, t, like).expand_as(like)
        return torch.exp(log_variance), log_variance

    def p_mean_variance(
        self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, variance_type: str = "fixed_small"
    ) -> dict:
        """p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t² I) from the model's noise prediction ``eps`` = ε_θ(x_t, t).

        Returns ``{"mean", "variance", "log_variance", "pred_xstart"}``, each like ``x_t``.
        """
        variance, log_variance = self.p_variance(t, x_t, variance_type)
        return {
            "mean": self.mean_from_eps(x_t, t, eps),
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": self.predict_xstart_from_eps(x_t, t, eps),
        }

    def p_sample(
        self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, variance_type="fixed_small"
    ) -> torch.Tensor:
        """One step of Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = 0 at the last step (t == 0)."""
        out = self.p_mean_variance(eps, x_t, t, variance_type)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def respaced(self, timesteps) -> "GaussianDiffusion":
        """The process restricted to the ascending indices ``timesteps`` τ_1 < … < τ_K (Nichol & Dhariwal
        2021 §4, improved-diffusion's ``SpacedDiffusion``): ᾱ'_k = ᾱ_{τ_k}, so β'_k = 1 − ᾱ_{τ_k}/ᾱ_{τ_{k−1}}
        (ᾱ_{τ_0} := 1). Index k of the result is step τ_k of this one; the model is still called with τ_k.
        These are the β of ``DDPMScheduler.step`` between consecutive inference timesteps."""
        taus = np.asarray(timesteps, dtype=np.int64)
        if taus.ndim != 1 or len(taus) == 0 or (np.diff(taus) <= 0).any() or taus[0] < 0 or taus[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be ascending distinct indices in 0..{self.num_timesteps - 1}")
        abar = self.alphas_cumprod[taus]
        return GaussianDiffusion.from_betas(1.0 - abar / np.append(1.0, abar[:-1]))

    def eps_from_prediction(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str):
        """ε from a model that predicts ε, x_0 (``sample``) or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (``v_prediction``):
        from x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, ε = (x_t − √ᾱ_t x_0)/√(1−ᾱ_t) and ε = √ᾱ_t v + √(1−ᾱ_t) x_t.
        Lets Algorithm 2 (ε-parameterised) sample imported models of the other two kinds."""
        if prediction_type == "epsilon":
            return output
        a, s = extract(self.sqrt_alphas_cumprod, t, x_t), extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "v_prediction":
            return a * output + s * x_t
        if prediction_type == "sample":
            return (x_t - a * output) / s
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample")

    def ancestral_sample(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_T: torch.Tensor,
        *,
        noise: Callable[[tuple], torch.Tensor],
        timesteps=None,
        variance_type: str = "fixed_small",
        on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Algorithm 2, the whole loop: from x_T ~ N(0, I) (given: the caller draws it) down to x_0,
        x_{t−1} = (x_t − β_t/√(1−ᾱ_t) · ε_θ(x_t, t)) / √α_t + σ_t z, z ~ N(0, I) for t > 1, else 0,
        with σ_t² = β̃_t (``fixed_small``) or β_t (``fixed_large``).

        ``eps_fn(x_t, t) -> ε_θ`` is the model (classifier-free guidance, if any, is inside it); ``t``
        is a (B,) LongTensor of the *original* index. ``noise(shape)`` is the per-step noise source z
        (called once per step but the last, in order: a seeded source makes the loop reproducible and
        lets a test feed diffusers' ``DDPMScheduler`` the same draws). ``timesteps``: the indices to
        visit, None for all T (the seed's loop); fewer run the same loop on :meth:`respaced` β, as
        ``DDPMScheduler`` does with ``set_timesteps``. ``on_step(i, t, x_{t−1})`` after step i.
        Returns x_0, like ``x_T``.

        Differs from ``DDPMScheduler.step`` only where Algorithm 2 says so: at the last step diffusers
        still adds √(clamp(σ², 1e-20))·z for t > 0 (10⁻¹⁰·z with ``fixed_small``; β_t·z with
        ``fixed_large`` on a respaced loop, where Algorithm 2 adds nothing).
        """
        taus = list(range(self.num_timesteps)) if timesteps is None else sorted({int(t) for t in timesteps})
        if timesteps is not None and len(taus) != len(timesteps):
            raise ValueError("timesteps must be distinct")
        spaced = self if len(taus) == self.num_timesteps else self.respaced(taus)
        x, b = x_T, x_T.shape[0]
        for i, k in enumerate(range(len(taus) - 1, -1, -1)):
            t_model = torch.full((b,), taus[k], dtype=torch.long, device=x.device)
            t_spaced = torch.full((b,), k, dtype=torch.long, device=x.device)
            eps = eps_fn(x, t_model).to(x.dtype)
            z = noise(tuple(x.shape)) if k > 0 else torch.zeros_like(x)
            x = spaced.p_sample(eps, x, t_spaced, z, variance_type)
            if on_step is not None:
                on_step(i, taus[k], x)
        return x

    # ---- objectives ------------------------------------------------------------------------

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), (B,) float32 (for Min-SNR weighting)."""
        return torch.from_numpy(self.alphas_cumprod / (1.0 - self.alphas_cumprod)).to(t.device)[t].float()

    def l_simple(self, eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_simple per example: mean over dims of ‖ε − ε_θ(x_t, t)‖² (DDPM eq. 14). Returns (B,)."""
        return mean_flat((noise - eps_pred) ** 2)

    def prior_kl(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in nats per dim, (B,). No parameters: a constant of the data."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean)))

    def vb_term(
        self,
        eps: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        variance_type: str = "fixed_small",
        bin_width: float = 2.0 / 255.0,
        data_range: tuple[float, float] | None = (-1.0, 1.0),
    ) -> torch.Tensor:
        """One VLB term in nats per dim, (B,):

        - t ≥ 1: L_{t} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) (KL of two Gaussians, closed form);
        - t == 0: L_0 = −log p_θ(x_0 | x_1), the discretised Gaussian decoder of DDPM §3.3 with bins of
          ``bin_width`` (2/255 for 8-bit data in [−1, 1]); see :func:`discretized_gaussian_log_likelihood`.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(eps, x_t, t, variance_type)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, out["mean"], 0.5 * out["log_variance"], bin_width=bin_width, data_range=data_range
            )
        )
        return torch.where(t == 0, nll, kl)

    def vlb_terms_bpd(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        *,
        timesteps: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        variance_type: str = "fixed_small",
        bin_width: float = 2.0 / 255.0,
        data_range: tuple[float, float] | None = (-1.0, 1.0),
    ) -> dict:
        """Bits per dim of the variational bound, L_VLB = L_T + Σ_{t≥1} L_{t} + L_0, for each example.

        ``eps_fn(x_t, t) -> ε_θ`` is the model. With ``timesteps=None`` every one of the T terms is
        evaluated (T model calls). Given K distinct indices, Σ_t L_t is estimated as Σ_k w_k L_{t_k}
        with ``weights`` w (K,); without weights w_k = T/K, the unbiased estimate for indices drawn
        uniformly without replacement (the Monte Carlo over t of Ho et al.'s L = E_t[…]). One fresh
        ε ~ N(0, I) per term, from ``generator``.

        Returns ``{"total_bpd": (B,), "prior_bpd": (B,), "terms_bpd": (B, K), "timesteps": (K,)}``.
        Written here by hand: diffusers has no VLB.
        """
        T = self.num_timesteps
        if timesteps is None:
            timesteps = torch.arange(T)
        timesteps = timesteps.to(torch.long).cpu()
        if len(torch.unique(timesteps)) != len(timesteps) or timesteps.min() < 0 or timesteps.max() >= T:
            raise ValueError(f"timesteps must be distinct indices in 0..{T - 1}")
        terms = []
        for t_int in timesteps.tolist():
            t = torch.full((x_start.shape[0],), t_int, dtype=torch.long, device=x_start.device)
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                eps = eps_fn(x_t, t)
            terms.append(
                self.vb_term(
                    eps, x_start, x_t, t, variance_type=variance_type, bin_width=bin_width, data_range=data_range
                )
            )
        terms_bpd = torch.stack(terms, dim=1) / math.log(2.0)
        prior_bpd = self.prior_kl(x_start) / math.log(2.0)
        if weights is None:
            weights = torch.full((len(timesteps),), T / len(timesteps))
        if weights.shape != timesteps.shape:
            raise ValueError("weights must have one entry per timestep")
        total = prior_bpd + (terms_bpd * weights.to(terms_bpd)).sum(dim=1)
        return {"total_bpd": total, "prior_bpd": prior_bpd, "terms_bpd": terms_bpd, "timesteps": timesteps}


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------


def train_step(
    diffusion: GaussianDiffusion,
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    *,
    generator: torch.Generator,
    gradient_step: Callable[[torch.Tensor], None],
    min_snr_gamma: float | None = None,
    shard: Callable[..., tuple[torch.Tensor, ...]] | None = None,
    weigh: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Algorithm 1, one step: t ~ Uniform{1..T} (0-based here), ε ~ N(0, I), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    (:meth:`GaussianDiffusion.q_sample`), then a gradient step on L_simple = ‖ε − ε_θ(x_t, t)‖²
    (mean over examples; per example optionally weighted by Min-SNR-γ). Returns the loss (a scalar).

    t then ε are drawn from ``generator`` on the CPU (the same numbers on every device), in that order,
    and moved to ``x_start``'s device; ``eps_fn`` is called after both draws (a caller may draw more,
    e.g. caption dropout, inside it: the order is then t, ε, its own). ``gradient_step(loss)`` is the
    optimiser's part (zero grads, backward, clip, step): the caller's policy, not the algorithm's.
    The prediction is compared in float32 (it may come from a bf16 autocast).

    Data-parallel (:mod:`worker.model.distributed`): every rank draws the whole global batch's t
    and ε (the same numbers as one rank would), ``eps_fn`` predicts only this rank's rows, the ones
    ``shard(*tensors)`` selects, and ``weigh(loss, local, total)`` scales this rank's mean so that
    the ranks' averaged gradient is the global mean's. Without them: one rank, the whole batch.
    """
    b = x_start.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=generator).to(x_start.device)  # (B,)
    noise = torch.randn(tuple(x_start.shape), generator=generator).to(x_start.device)  # ε, like x_0
    x_t = diffusion.q_sample(x_start, t, noise)
    prediction = eps_fn(x_t, t)  # (B_local, ...): this rank's rows
    if shard is not None:
        t, noise = shard(t, noise)
    per_example = diffusion.l_simple(prediction.float(), noise)  # (B_local,)
    if min_snr_gamma is not None:  # Min-SNR-γ (Hang et al. 2023), ε-prediction form: min(SNR, γ)/SNR
        snr = diffusion.snr(t)
        per_example = per_example * snr.clamp(max=min_snr_gamma) / snr
    loss = per_example.mean()
    if weigh is not None:
        loss = weigh(loss, len(t), b)
    gradient_step(loss)
    return loss


# --------------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) elementwise, in nats:
    ½ (log σ2² − log σ1² + σ1²/σ2² + (μ1 − μ2)²/σ2² − 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    bin_width: float = 2.0 / 255.0,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """log P(x) elementwise for the discretised Gaussian decoder of DDPM §3.3 (eq. 13).

    The probability of the bin [x − w/2, x + w/2] under N(mean, exp(log_scale)²), w = ``bin_width``,
    with the exact normal CDF in log space (``torch.special.log_ndtr``; DDPM's code uses a tanh
    approximation and clamps the probability at 1e-12).
    With ``data_range=(lo, hi)`` the outermost bins extend to ∓∞ (x within w/2 of lo or hi), as DDPM
    does for 8-bit images scaled to [−1, 1] (w = 2/255). ``data_range=None`` means no edge bins: the
    right choice for unbounded data such as autoencoder latents quantised at resolution w.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    z_plus = inv_stdv * (centered + bin_width / 2)
    z_min = inv_stdv * (centered - bin_width / 2)
    # log(Φ(z+) − Φ(z−)) in log space, on the side of the mean where both CDFs are small, so that
    # neither cancellation nor underflow limits it (improved-diffusion clamps the probability at 1e-12).
    lower = centered <= 0
    hi = torch.where(lower, z_plus, -z_min)
    lo = torch.where(lower, z_min, -z_plus)
    log_hi = torch.special.log_ndtr(hi)
    log_probs = log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))
    if data_range is not None:
        lo, hi = data_range
        edge = bin_width / 2 * 0.998  # improved-diffusion's 0.999 for w = 2/255
        log_cdf_plus = torch.special.log_ndtr(z_plus)  # log P(X ≤ x + w/2)
        log_one_minus_cdf_min = torch.special.log_ndtr(-z_min)  # log P(X ≥ x − w/2)
        log_probs = torch.where(
            x < lo + edge, log_cdf_plus, torch.where(x > hi - edge, log_one_minus_cdf_min, log_probs)
        )
    return log_probs
