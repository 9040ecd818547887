"""Evaluation of a latent diffusion model: loss curve, sample grid, held-out VLB, digits metrics.

- :func:`loss_curve_png` — the training losses (log scale), drawn with Pillow (no matplotlib).
- :func:`image_grid_png` — a grid of generated images.
- :func:`heldout_bits_per_dim` — the variational bound on held-out data via :mod:`worker.model.diffusion`:
  bits per dimension of the *scaled latents* z = scaling_factor · E(x) (posterior mean), quantised at
  2/255 (the resolution DDPM uses for pixels in [−1, 1]) with no edge bins. It measures the U-Net as a
  density model of the latents; it is not a pixel likelihood (the decoder is deterministic).
- :class:`DigitsJudge` — for ``builtin:digits``: the share of generated images that an
  SVC(gamma=0.001, C=10), trained on the 1,797 real 8×8 digits, reads as the requested digit, and the
  Fréchet distance between generated and real digits in a fixed feature space (PCA-16 of the 8×8
  images, fitted on the real digits), next to its floor: the distance of the same number of *real*
  digits to all real digits (averaged over random draws), which is what sampling noise alone costs.
  Generated R×R images are averaged to gray, block-averaged to 8×8 and rescaled to 0..16 (the exact
  inverse of :func:`worker.model.data.load_digits`).
- :func:`generate` — images from a :class:`diffusers.StableDiffusionPipeline` (the same code path a
  user of the saved model runs) with any of ``shared.catalog.SCHEDULERS`` (DDPM as Algorithm 2,
  :mod:`worker.model.ancestral`, as sampling jobs run it).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from worker.model.ancestral import run_pipeline
from worker.model.diffusion import GaussianDiffusion
from worker.model.sampling import STEP_TENSORS, step_callback
from worker.model.schedulers import make_scheduler


# --------------------------------------------------------------------------------------------
# Sampling through diffusers
# --------------------------------------------------------------------------------------------



@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    scheduler="dpm-solver++",
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch_size: int = 100,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts`` (one image each), seeded, in batches.
    ``scheduler``: a name of ``shared.catalog.SCHEDULERS``, or a scheduler built on the model's
    config (a benchmark's variant of one)."""
    base_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, base_scheduler.config) if isinstance(scheduler, str) else scheduler
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            res = run_pipeline(  # the pipeline, or Algorithm 2 for ddpm
                pipe,
                prompt=prompts[i : i + batch_size],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gen,
                output_type="pt",
                callback_on_step_end=step_callback(gen),
                callback_on_step_end_tensor_inputs=STEP_TENSORS,
            )
            out.append(res.images.float().cpu())
    finally:
        pipe.scheduler = base_scheduler
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def image_grid_png(images: torch.Tensor, path: Path, *, ncol: int, scale: int = 2, pad: int = 2) -> Path:
    """Save (N, 3, H, W) images in [0, 1] as a grid with ``ncol`` columns, each image enlarged ``scale``×."""
    from PIL import Image

    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    H, W = h * scale, w * scale
    grid = Image.new("RGB", (ncol * (W + pad) + pad, nrow * (H + pad) + pad), (255, 255, 255))
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        tile = Image.fromarray(arr[i]).resize((W, H), Image.NEAREST)
        grid.paste(tile, (pad + (i % ncol) * (W + pad), pad + (i // ncol) * (H + pad)))
    path = Path(path)
    grid.save(path)
    return path


def loss_curve_png(history: dict[str, list[tuple[int, float]]], path: Path, *, size=(720, 400)) -> Path:
    """Plot ``{stage: [(global step, loss), …]}`` on a log-scale y axis: raw losses faint, a moving
    average bold, one colour per stage; saved as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, size[0] - 20, 30, size[1] - 40
    points = [(s, v) for series in history.values() for s, v in series if v > 0 and math.isfinite(v)]
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if not points:
        draw.text((left + 10, top + 10), "no losses yet", fill=(0, 0, 0), font=font)
        img.save(path)
        return Path(path)
    s_min, s_max = min(p[0] for p in points), max(p[0] for p in points)
    ly_min, ly_max = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
    if s_max == s_min:
        s_max += 1
    if ly_max - ly_min < 1e-6:
        ly_min, ly_max = ly_min - 0.5, ly_max + 0.5

    def xy(step, value):
        x = left + (step - s_min) / (s_max - s_min) * (right - left)
        y = bottom - (math.log10(value) - ly_min) / (ly_max - ly_min) * (bottom - top)
        return x, y

    # y ticks at powers of ten and their 2x / 5x within range
    for e in range(math.floor(ly_min), math.ceil(ly_max) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if ly_min <= math.log10(v) <= ly_max:
                _, y = xy(s_min, v)
                draw.line([left - 4, y, left, y], fill=(0, 0, 0))
                draw.line([left + 1, y, right - 1, y], fill=(230, 230, 230))
                draw.text((5, y - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    for k in range(5):
        s = s_min + k * (s_max - s_min) / 4
        x, _ = xy(s, 10**ly_min)
        draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        draw.text((x - 12, bottom + 8), f"{int(s)}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 30, size[1] - 16), "global step", fill=(0, 0, 0), font=font)
    for i, (stage, series) in enumerate(history.items()):
        series = [(s, v) for s, v in series if v > 0 and math.isfinite(v)]
        if not series:
            continue
        colour = colours[i % len(colours)]
        faint = tuple(int(c + (255 - c) * 0.7) for c in colour)
        if len(series) > 1:
            draw.line([xy(s, v) for s, v in series], fill=faint, width=1)
        window = max(1, len(series) // 50)
        vals = np.log10([v for _, v in series])
        smooth = np.convolve(vals, np.ones(window) / window, mode="valid")
        steps = [s for s, _ in series][window - 1 :]
        if len(smooth) > 1:
            draw.line([xy(s, 10**v) for s, v in zip(steps, smooth)], fill=colour, width=2)
        draw.text((left + 10 + 160 * i, 10), f"{stage}: last {series[-1][1]:.4g}", fill=colour, font=font)
    img.save(path)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Held-out variational bound
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_bits_per_dim(
    unet,
    latents: torch.Tensor,
    context: torch.Tensor,
    diffusion: GaussianDiffusion,
    *,
    num_terms: int = 50,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """VLB in bits per latent dimension of ``latents`` (N, C, h, w) (already scaled) under the
    ε-predicting ``unet`` conditioned on ``context`` (N, L, D); see the module docstring.

    ``num_terms`` ≥ 2: L_0 is always evaluated; the other T − 1 terms are estimated by stratified
    sampling (see :func:`vlb_timesteps`), exact when ``num_terms`` = T. Returns
    ``{"bits_per_dim", "prior_bpd", "l0_bpd", "num_terms", "num_examples"}``.
    """
    gen = torch.Generator().manual_seed(seed)
    timesteps, weights = vlb_timesteps(diffusion.num_timesteps, num_terms, gen)
    device = next(unet.parameters()).device
    totals, priors, l0s = [], [], []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i : i + batch_size].to(device)
        ctx = context[i : i + batch_size].to(device)

        def eps_fn(x_t, t, ctx=ctx):
            return unet(x_t, t, encoder_hidden_states=ctx).sample.to(x_t.dtype)

        out = diffusion.vlb_terms_bpd(
            eps_fn, z, timesteps=timesteps, weights=weights, generator=gen, data_range=None
        )
        totals.append(out["total_bpd"])
        priors.append(out["prior_bpd"])
        l0s.append(out["terms_bpd"][:, 0])
    total = torch.cat(totals)
    return {
        "bits_per_dim": float(total.mean()),
        "prior_bpd": float(torch.cat(priors).mean()),
        "l0_bpd": float(torch.cat(l0s).mean()),
        "num_terms": int(len(timesteps)),
        "num_examples": int(total.shape[0]),
    }


def vlb_timesteps(num_timesteps: int, num_terms: int, generator: torch.Generator):
    """Indices and weights for an unbiased, low-variance estimate of Σ_t L_t over t = 0..T−1.

    Index 0 (L_0) always, with weight 1; the rest of 1..T−1 is cut into ``num_terms − 1`` contiguous
    strata of geometrically growing size (single steps near t = 0, where the terms are largest and
    change fastest; long strata near T, where they are small and flat), and one index is drawn
    uniformly from each stratum, weighted by the stratum's size. ``num_terms == T`` is exact.
    """
    if not 2 <= num_terms <= num_timesteps:
        raise ValueError(f"num_terms must be in 2..{num_timesteps}; got {num_terms}")
    n = num_terms
    while True:  # geometric edges in [1, T], as many distinct ones as strata are wanted
        edges = np.unique(np.round(np.geomspace(1, num_timesteps, n)).astype(np.int64))
        if len(edges) >= num_terms or n > 100 * num_timesteps:
            break
        n += 1
    edges = edges[:num_terms - 1].tolist() + [num_timesteps]
    picks, weights = [0], [1.0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        picks.append(lo + int(torch.randint(hi - lo, (1,), generator=generator).item()))
        weights.append(float(hi - lo))
    return torch.tensor(picks), torch.tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Digits: conditional accuracy and Fréchet distance
# --------------------------------------------------------------------------------------------


def to_digits_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, R, R) in [0, 1] -> (N, 64) gray 8×8 images with values 0..16, as scikit-learn's digits."""
    gray = images.float().mean(dim=1, keepdim=True)
    k = images.shape[-1] // 8
    small = torch.nn.functional.avg_pool2d(gray, k) if k > 1 else gray
    return (small.clamp(0, 1) * 16.0).reshape(images.shape[0], 64).numpy().astype(np.float64)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)."""
    from scipy import linalg

    with warnings.catch_warnings():  # a singular Σ (e.g. identical images) is a legitimate input
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        eps = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


class DigitsJudge:
    """Classifier and feature space for judging generated digits (fitted once on the real digits)."""

    def __init__(self, pca_components: int = 16):
        from sklearn.datasets import load_digits
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        digits = load_digits()
        self.real = digits.data.astype(np.float64)  # (1797, 64), 0..16
        self.labels = digits.target
        self.svc = SVC(gamma=0.001, C=10).fit(self.real, self.labels)
        self.pca = PCA(n_components=pca_components, random_state=0).fit(self.real)
        feats = self.pca.transform(self.real)
        self.mu, self.cov = feats.mean(0), np.cov(feats, rowvar=False)

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Share of ``images`` (N, 3, R, R) in [0, 1] the SVC reads as their requested ``labels``."""
        pred = self.svc.predict(to_digits_8x8(images))
        return float((pred == np.asarray(labels)).mean())

    def frechet_of_8x8(self, x8: np.ndarray) -> float:
        feats = self.pca.transform(x8)
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.mu, self.cov)

    def frechet(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images`` to all real digits in PCA-16 space."""
        return self.frechet_of_8x8(to_digits_8x8(images))

    def floor(self, n: int, *, repeats: int = 20, seed: int = 0) -> tuple[float, float]:
        """(mean, std) over ``repeats`` draws of the distance of ``n`` real digits (without
        replacement) to all real digits."""
        rng = np.random.default_rng(seed)
        vals = [self.frechet_of_8x8(self.real[rng.choice(len(self.real), n, replace=False)]) for _ in range(repeats)]
        return float(np.mean(vals)), float(np.std(vals))


def digit_prompts(n: int) -> tuple[list[str], list[int]]:
    """``n`` prompts cycling through the ten digits, and their labels."""
    from worker.model.data import digit_caption

    labels = [i % 10 for i in range(n)]
    return [digit_caption(y) for y in labels], labels


def evaluate_digits(
    pipe,
    judge: DigitsJudge,
    *,
    num_samples: int,
    scheduler: str,
    steps: int,
    guidance_scale: float,
    seed: int = 0,
) -> dict:
    """Generate ``num_samples`` class-balanced digits and return accuracy, Fréchet distance and floor."""
    prompts, labels = digit_prompts(num_samples)
    images = generate(pipe, prompts, scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, seed=seed)
    fd = judge.frechet(images)
    floor, floor_std = judge.floor(num_samples, seed=seed)
    return {
        "accuracy": judge.accuracy(images, labels),
        "frechet": fd,
        "frechet_floor": floor,
        "frechet_floor_std": floor_std,
        "frechet_ratio": fd / floor,
        "num_samples": num_samples,
        "scheduler": scheduler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "images": images,
        "labels": labels,
    }
