"""The evaluation training stores with its checkpoints (``metrics.json``, ``samples.png``,
``loss_curve.png`` in the checkpoint directory), built on the measures of :mod:`worker.model.evaluation`.

- autoencoder stage (:func:`evaluate_autoencoder`): the held-out reconstruction MSE
  ‖x − D(μ(x))‖² per pixel (decoding the posterior mean), and a grid of held-out images next to
  their reconstructions;
- U-Net stage (:class:`UNetEvaluator`): a sample grid (each validation prompt in a row), the
  held-out variational bound in bits per latent dimension, and for ``builtin:digits`` the share of
  samples read as the requested digit and their Fréchet distance to the real digits, next to the
  floor of that distance and what the autoencoder alone costs; at the final checkpoint, for each
  guidance candidate, and the model's sampling defaults chosen from them (:func:`choose_guidance`).

Samples come from the assembled ``StableDiffusionPipeline`` with the samplers of
:func:`worker.model.schedulers.make_scheduler`, the very ones sampling jobs use: what is measured
is what a job samples. Every draw comes from generators seeded with ``params.seed`` and created
here, never from the training generator, so evaluating changes nothing of the training run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.train_schema import TrainParams
from worker.model import evaluation
from worker.model.parts import assemble_pipeline, encode_captions, encode_posteriors

GRID_IMAGES_PER_PROMPT = 8


@torch.no_grad()
def _reconstruct(vae, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """D(μ(x)) for images x (N, 3, R, R): the reconstruction through the posterior mean."""
    return torch.cat(
        [vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mean).sample for i in range(0, len(x), batch_size)]
    )


def evaluate_autoencoder(vae, heldout, loss_history: dict, ckpt: Path, step: int, device) -> dict:
    """Evaluate the autoencoder being trained into checkpoint ``ckpt`` (global ``step``): held-out
    MSE in ``metrics.json``, 16 (image, reconstruction) pairs in ``samples.png`` and the loss curve.
    The autoencoder is put in eval mode for this and back in train mode after."""
    vae.eval()
    x = heldout.images.to(device)
    recon = _reconstruct(vae, x)
    vae.train()
    mse = F.mse_loss(recon, x).item()
    n = min(16, len(x))
    pairs = torch.stack([x[:n], recon[:n]], dim=1).reshape(2 * n, *x.shape[1:])  # (2n, 3, R, R), interleaved
    evaluation.image_grid_png((pairs.cpu() + 1) / 2, ckpt / "samples.png", ncol=8)
    evaluation.loss_curve_png(loss_history, ckpt / "loss_curve.png")
    metrics = {"step": step, "autoencoder_heldout_mse": mse}
    (ckpt / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


class UNetEvaluator:
    """The evaluation stored with each U-Net checkpoint: loss curve, sample grid, held-out VLB, and for
    digits accuracy and Fréchet distance with its floor.

    ``frozen`` holds the parts that do not train in this stage (``vae``, ``text_encoder``,
    ``tokenizer``, ``scheduler``: the keyword arguments of :func:`assemble_pipeline`). What does not
    change between checkpoints (held-out latents and captions, the digits judge) is computed at the
    first evaluation, once the autoencoder's ``scaling_factor`` is final."""

    def __init__(self, params: TrainParams, device, frozen: dict, train_set, heldout, diffusion):
        self.params, self.device, self.frozen, self.heldout, self.diffusion = params, device, frozen, heldout, diffusion
        self.is_digits = train_set.name == "builtin:digits"
        if params.validation_prompts:
            self.prompts = params.validation_prompts
        elif self.is_digits:
            self.prompts = evaluation.digit_prompts(10)[0]  # zero … nine
        else:
            self.prompts = sorted(set(train_set.captions))[:10]
        self._judge = None
        self._heldout_latents = None  # (N, C, h, w), scaled: z = scaling_factor · μ(x)
        self._heldout_context = None  # (N, L, D): τ(y) of the held-out captions

    def _prepare(self):
        vae, dev = self.frozen["vae"], self.device
        if self._heldout_latents is None and len(self.heldout):
            mean, _ = encode_posteriors(vae, self.heldout.images.to(dev))
            self._heldout_latents = mean * float(vae.config.scaling_factor)
            self._heldout_context = encode_captions(
                self.frozen["tokenizer"], self.frozen["text_encoder"], self.heldout.captions, dev
            )
        if self.is_digits and self._judge is None:
            self._judge = evaluation.DigitsJudge()

    @torch.no_grad()
    def _autoencoder_frechet(self, n: int, seed: int) -> float:
        """Fréchet distance of n real digits passed through the autoencoder (encode, posterior mean,
        decode): what the autoencoder alone costs, the best a perfect U-Net could reach."""
        from worker.model.data import load_digits

        real = load_digits(self.params.resolution).images
        idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
        vae = self.frozen["vae"]
        recon = vae.decode(vae.encode(real[idx].to(self.device)).latent_dist.mean).sample
        return self._judge.frechet(((recon.float().cpu() + 1) / 2).clamp(0, 1))

    def evaluate(self, unet, ckpt: Path, step: int, loss_history: dict, *, final: bool = False) -> dict:
        """Evaluate ``unet`` (the weights to judge: the EMA copy, in eval mode) into checkpoint
        ``ckpt`` of global ``step``; returns what ``metrics.json`` holds.

        At the ``final`` checkpoint the model's sampling defaults are chosen (``sampling_defaults``:
        the evaluation's scheduler and steps, and for digits the guidance of
        ``params.eval_guidance_candidates`` that :func:`choose_guidance` picks, with every
        candidate's figures in ``guidance_sweep``); the accuracy and Fréchet stored are then those
        at the chosen guidance, the quality a request that leaves guidance out gets."""
        p = self.params
        self._prepare()
        pipe = assemble_pipeline(unet, **self.frozen)
        metrics: dict = {"step": step}
        # sample grid: each validation prompt in a row
        prompts = [q for q in self.prompts for _ in range(GRID_IMAGES_PER_PROMPT)]
        grid = evaluation.generate(
            pipe, prompts, scheduler=p.eval_scheduler, steps=p.eval_steps, guidance_scale=p.eval_guidance_scale, seed=p.seed
        )
        evaluation.image_grid_png(grid, ckpt / "samples.png", ncol=GRID_IMAGES_PER_PROMPT)
        evaluation.loss_curve_png(loss_history, ckpt / "loss_curve.png")
        if self._heldout_latents is not None:
            vlb = evaluation.heldout_bits_per_dim(
                unet, self._heldout_latents, self._heldout_context, self.diffusion, num_terms=p.vlb_timesteps, seed=p.seed
            )
            metrics["heldout_bits_per_dim"] = vlb["bits_per_dim"]
            metrics["heldout_vlb"] = vlb
        guidance, rule = p.eval_guidance_scale, "no quality measure for this dataset: the evaluation's own guidance"
        if self.is_digits:
            sweep = {w: self._digits(pipe, w) for w in (p.eval_guidance_candidates if final else [guidance])}
            if final:
                guidance, rule = choose_guidance(sweep), GUIDANCE_RULE
                metrics["guidance_sweep"] = [{k: r[k] for k in SWEEP_FIELDS} for r in sweep.values()]
            metrics.update({k: v for k, v in sweep[guidance].items() if k not in ("images", "labels")})
            metrics["autoencoder_frechet"] = self._autoencoder_frechet(p.eval_num_samples, p.seed)
        if final:
            metrics["sampling_defaults"] = {"scheduler": p.eval_scheduler, "steps": p.eval_steps,
                                            "guidance_scale": float(guidance)}
            metrics["sampling_defaults_rule"] = rule
        (ckpt / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def _digits(self, pipe, guidance_scale: float) -> dict:
        p = self.params
        return evaluation.evaluate_digits(pipe, self._judge, num_samples=p.eval_num_samples, scheduler=p.eval_scheduler,
                                          steps=p.eval_steps, guidance_scale=guidance_scale, seed=p.seed)


# The digits bar (issue 6): accuracy ≥ 0.97 and Fréchet ≤ 2× the real-vs-real floor.
FRECHET_BAR = 2.0
SWEEP_FIELDS = ("guidance_scale", "accuracy", "frechet", "frechet_ratio")
GUIDANCE_RULE = (f"the highest accuracy among the candidates with Fréchet ≤ {FRECHET_BAR:g}× the floor (equal "
                 "accuracy: the lower Fréchet); none within it: the lowest Fréchet")


def choose_guidance(sweep: dict[float, dict]) -> float:
    """The guidance a model samples with by default, from its evaluation at each candidate
    (``{w: {"accuracy", "frechet_ratio", …}}``): :data:`GUIDANCE_RULE`.

    Why: guidance trades spread for accuracy (defaults, 200 samples, DPM-Solver++ 20, 2026-12-03:
    w = 1 → 0.90 and 1.10× the floor, 1.5 → 0.965 and 1.11×, 2 → 0.975 and 1.51×, 3 → 0.98 and
    2.54×, 5 → 0.99 and 4.52×; a bare request at the chosen w = 2, fresh noise: 0.975, 1.59×;
    docs/benchmarks.md). The Fréchet bar bounds how much spread may be
    given up; within it, the digit asked for is what a user wants first. Lowest-Fréchet-first
    would pick 1.5, below the accuracy bar.
    """
    within = [w for w, r in sweep.items() if r["frechet_ratio"] <= FRECHET_BAR]
    if not within:
        return min(sweep, key=lambda w: (sweep[w]["frechet_ratio"], w))
    return max(within, key=lambda w: (sweep[w]["accuracy"], -sweep[w]["frechet_ratio"], -w))
