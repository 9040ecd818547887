"""worker/model/evaluation.py: pictures, the digits judge, Fréchet distance and the held-out VLB."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from worker.model import evaluation
from worker.model.data import load_dataset
from worker.model.diffusion import GaussianDiffusion


@pytest.fixture(scope="module")
def judge():
    return evaluation.DigitsJudge()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("builtin:digits", resolution=32)


def test_loss_curve_png(tmp_path):
    history = {
        "autoencoder": [[s, 1.0 / s] for s in range(1, 101)],
        "unet": [[100 + s, 0.5 + 0.1 * math.sin(s)] for s in range(1, 201)],
    }
    path = evaluation.loss_curve_png(history, tmp_path / "loss.png")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (720, 400)
    colours = {c for _, c in img.getcolors(100_000)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # both stages drawn
    empty = Image.open(evaluation.loss_curve_png({}, tmp_path / "empty.png"))
    assert empty.size == (720, 400)


def test_image_grid_png(tmp_path):
    images = torch.zeros(5, 3, 8, 8)
    images[1] = 1.0
    path = evaluation.image_grid_png(images, tmp_path / "grid.png", ncol=2, scale=2, pad=2)
    img = Image.open(path).convert("RGB")
    assert img.size == (2 * 18 + 2, 3 * 18 + 2)
    assert img.getpixel((2 + 18 + 5, 2 + 5)) == (255, 255, 255)  # image 1 is white
    assert img.getpixel((2 + 5, 2 + 5)) == (0, 0, 0)  # image 0 is black


def test_to_digits_8x8_inverts_the_dataset_upsampling(digits):
    from sklearn.datasets import load_digits

    x8 = evaluation.to_digits_8x8((digits.images[:50] + 1) / 2)
    np.testing.assert_allclose(x8, load_digits().data[:50], atol=1e-5)


def test_judge_reads_real_digits_and_rejects_noise(judge, digits):
    idx = torch.arange(0, 1797, 7)
    assert judge.accuracy((digits.images[idx] + 1) / 2, digits.labels[idx].numpy()) > 0.97
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert judge.accuracy(noise, [i % 10 for i in range(200)]) < 0.3


def test_frechet_distance_basics(judge, digits):
    mu, cov = np.zeros(3), np.diag([1.0, 2.0, 3.0])
    assert evaluation.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    # 1-D Gaussians: (μ1 − μ2)² + (σ1 − σ2)²
    d = evaluation.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[1.0]]))
    assert d == pytest.approx(4.0 + 1.0)
    # real digits sit at the floor; one digit class only or blank images are far above it
    floor, floor_std = judge.floor(200, seed=1)
    rng = np.random.default_rng(5)
    real = (digits.images[rng.choice(1797, 200, replace=False)] + 1) / 2
    assert judge.frechet(real) < floor + 4 * floor_std
    sevens = (digits.images[digits.labels == 7][:150] + 1) / 2
    assert judge.frechet(sevens) > 3 * floor
    assert judge.frechet(torch.zeros(200, 3, 32, 32)) > 10 * floor


def test_vlb_timesteps_are_a_stratified_cover():
    g = torch.Generator().manual_seed(0)
    ts, w = evaluation.vlb_timesteps(1000, 50, g)
    assert ts[0] == 0 and len(set(ts.tolist())) == 50 and w.sum().item() == 1000
    ts_all, w_all = evaluation.vlb_timesteps(1000, 1000, g)
    assert ts_all.tolist() == list(range(1000)) and torch.all(w_all == 1)
    with pytest.raises(ValueError, match="num_terms"):
        evaluation.vlb_timesteps(1000, 1, g)


class _FakeUNet(torch.nn.Module):
    """ε_θ(x_t) = 0.5 x_t, in the shape of a diffusers U-Net output."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, encoder_hidden_states=None):
        return type("Out", (), {"sample": 0.5 * x})()


def test_heldout_bits_per_dim_estimate_agrees_with_the_exact_bound():
    diffusion = GaussianDiffusion.linear()
    z = torch.randn(32, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = torch.zeros(32, 3, 8)
    exact = evaluation.heldout_bits_per_dim(_FakeUNet(), z, ctx, diffusion, num_terms=1000, seed=0)
    assert exact["num_terms"] == 1000 and exact["num_examples"] == 32
    estimates = [
        evaluation.heldout_bits_per_dim(_FakeUNet(), z, ctx, diffusion, num_terms=20, seed=s)["bits_per_dim"]
        for s in range(10)
    ]
    # stratified estimates scatter little around the exact value
    assert abs(np.mean(estimates) - exact["bits_per_dim"]) < 0.02 * exact["bits_per_dim"]
    assert exact["bits_per_dim"] > exact["l0_bpd"] / 1000 > 0


def test_make_scheduler_turns_clipping_off_and_rejects_unknown_names():
    from diffusers import DDPMScheduler

    config = DDPMScheduler(clip_sample=True).config
    assert evaluation.make_scheduler("ddim", config).config.clip_sample is False
    assert evaluation.make_scheduler("ddpm", config).config.clip_sample is False
    assert evaluation.make_scheduler("dpm-solver++", config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpm-solver\\+\\+"):
        evaluation.make_scheduler("euler", config)


def test_choose_guidance_takes_the_most_accurate_within_the_frechet_bar():
    from worker.model.train_eval import choose_guidance

    def sweep(*rows):
        return {w: {"accuracy": a, "frechet_ratio": r} for w, a, r in rows}

    # the defaults' figures (docs/benchmarks.md): w = 2 is the most accurate within 2× the floor
    assert choose_guidance(sweep((1.0, 0.90, 1.10), (1.5, 0.965, 1.11), (2.0, 0.975, 1.51), (3.0, 0.98, 2.54),
                                 (5.0, 0.99, 4.52))) == 2.0
    assert choose_guidance(sweep((1.5, 0.98, 1.3), (2.0, 0.98, 1.5))) == 1.5  # equal accuracy: the lower Fréchet
    assert choose_guidance(sweep((2.0, 0.99, 2.5), (3.0, 1.0, 3.1))) == 2.0  # none within: the lowest Fréchet
    assert choose_guidance(sweep((3.0, 0.99, 1.9), (5.0, 1.0, 1.95))) == 5.0
