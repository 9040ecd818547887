"""The Langevin corrector of langevin-pc: its step against a hand computation, its effect on data
whose score is known exactly, and its network evaluations as the catalog counts them."""

import math

import pytest
import torch

from shared.catalog import LANGEVIN_CORRECTOR_STEPS, network_evaluations
from worker.model.langevin import LangevinPCScheduler
from worker.model.schedulers import make_scheduler, noise_scheduler_config

CONFIG = noise_scheduler_config()


def test_corrector_step_matches_a_hand_computation():
    """Algorithm 5 (VP) for two images of 3 values: δ = 2 α_t (r‖z‖/‖s‖)², x + δ s + √(2δ) z,
    s = −ε/√(1−ᾱ_t), each image with its own norms."""
    sched = LangevinPCScheduler.from_config(CONFIG, corrector_steps=1, snr=0.2)
    t = 500
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    alpha_bar = math.prod(1 - b for b in betas[: t + 1])
    alpha = 1 - betas[t]
    x = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    eps = [[0.3, -0.6, 0.1], [2.0, 0.0, -1.0]]
    z = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]
    expected = []
    for xi, ei, zi in zip(x, eps, z):
        s = [-e / math.sqrt(1 - alpha_bar) for e in ei]
        step = 2 * alpha * (0.2 * math.hypot(*zi) / math.hypot(*s)) ** 2
        expected.append([a + step * b + math.sqrt(2 * step) * c for a, b, c in zip(xi, s, zi)])
    got = sched.correct(torch.tensor(eps, dtype=torch.float64), t, torch.tensor(x, dtype=torch.float64),
                        noise=torch.tensor(z, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    # The second image's step does not depend on the first (per-image norms, not the batch's).
    alone = sched.correct(torch.tensor(eps[1:], dtype=torch.float64), t, torch.tensor(x[1:], dtype=torch.float64),
                          noise=torch.tensor(z[1:], dtype=torch.float64))
    assert torch.allclose(alone[0], got[1])


MU, STD, DIM, N = 0.5, 0.3, 16, 4000


def exact_eps(sched, x, t):
    """ε of Gaussian data N(MU, STD²): q(x_t) = N(√ᾱ MU, v), v = ᾱ STD² + 1 − ᾱ, and ε = −√(1−ᾱ) ∇log q."""
    ab = sched.alphas_cumprod[int(t)].item()
    return (1 - ab) ** 0.5 * (x - ab**0.5 * MU) / (ab * STD**2 + 1 - ab)


def run_chain(sched, steps: int, seed: int = 0):
    """The pipeline's loop (predictor, then the corrector when the scheduler has one) with the exact ε;
    returns the samples and, at the last level a corrector sees, Var(x) / Var(q(x_t))."""
    gen = torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    x = torch.randn(N, DIM, generator=gen)
    pc = LangevinPCScheduler(getattr(sched, "predictor", sched), corrector_steps=1)
    ratio = None
    for t in sched.timesteps:
        x = sched.step(exact_eps(sched, x, t), t, x, generator=gen).prev_sample
        level = pc.corrector_timestep(t)
        if level is None:
            continue
        for _ in range(getattr(sched, "corrector_steps", 0)):
            x = sched.correct(exact_eps(sched, x, level), level, x, generator=gen)
        ab = sched.alphas_cumprod[level].item()
        ratio = x.var().item() / (ab * STD**2 + 1 - ab)
    return x, ratio


def test_on_gaussian_data_the_corrector_brings_few_step_ancestral_sampling_closer_to_the_truth():
    """With the exact ε, 10 ancestral steps shrink the spread (the last corrected level holds 0.75 of
    the true variance, measured); Langevin steps pull each level back towards q(x_t) (0.84), and the
    samples end nearer the data's std. Both keep the mean."""
    plain, plain_ratio = run_chain(make_scheduler("ddpm", CONFIG), 10)
    pc, pc_ratio = run_chain(LangevinPCScheduler.from_config(CONFIG, predictor="ddpm", corrector_steps=1), 10)
    assert abs(plain.mean() - MU) < 0.01 and abs(pc.mean() - MU) < 0.01
    assert abs(pc_ratio - 1) < abs(plain_ratio - 1) - 0.05
    assert abs(pc.std() - STD) < abs(plain.std() - STD) - 0.005


def test_a_larger_snr_takes_larger_steps():
    """r scales the step: at r = 0.5 the corrector overshoots a Gaussian's variance (Langevin's
    discretisation bias, ≈ 1/(1 − r²) per step), at r = 0.16 it stays within 15 %."""
    _, small = run_chain(LangevinPCScheduler.from_config(CONFIG, predictor="ddim", corrector_steps=1, snr=0.16), 10)
    _, large = run_chain(LangevinPCScheduler.from_config(CONFIG, predictor="ddim", corrector_steps=1, snr=0.5), 10)
    assert 0.85 < small < 1.15 and large > 1.3


def test_corrector_levels_are_where_the_predictor_lands():
    for predictor in ("ddim", "ddpm"):
        sched = LangevinPCScheduler.from_config(CONFIG, predictor=predictor, corrector_steps=1)
        sched.set_timesteps(10)
        ts = [int(t) for t in sched.timesteps]
        assert [sched.corrector_timestep(t) for t in ts] == ts[1:] + [None]


def test_bad_options_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="ddim, ddpm"):
        LangevinPCScheduler.from_config(CONFIG, predictor="euler", corrector_steps=1)
    with pytest.raises(ValueError, match="corrector_steps"):
        LangevinPCScheduler.from_config(CONFIG, corrector_steps=0)
    with pytest.raises(ValueError, match="snr"):
        LangevinPCScheduler.from_config(CONFIG, corrector_steps=1, snr=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_pipeline_run_costs_the_network_evaluations_the_catalog_counts(tiny_pipeline_dir, guidance):
    """steps predictor evaluations + M after every predictor step but the last, each of the guided
    batch (one U-Net call of 2B rows with guidance)."""
    from worker.model.evaluation import generate
    from worker.model.pipelines import load_pipeline_dir

    pipe = load_pipeline_dir(tiny_pipeline_dir)
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        images = generate(pipe, ["a", "b", "c"], scheduler="langevin-pc", steps=4, guidance_scale=guidance)
    finally:
        hook.remove()
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    assert len(batches) == network_evaluations("langevin-pc", 4) == 4 + 3 * LANGEVIN_CORRECTOR_STEPS
    assert set(batches) == {6 if guidance > 1 else 3}
    assert network_evaluations("ddim", 4) == 4


def test_same_seed_same_images_and_the_corrector_changes_them(tiny_pipeline_dir):
    from worker.model.evaluation import generate
    from worker.model.pipelines import load_pipeline_dir

    pipe = load_pipeline_dir(tiny_pipeline_dir)
    run = lambda scheduler, seed: generate(pipe, ["a", "b"], scheduler=scheduler, steps=3, guidance_scale=2.0,  # noqa: E731
                                           seed=seed)
    first = run("langevin-pc", 1)
    assert torch.equal(first, run("langevin-pc", 1))
    assert not torch.equal(first, run("langevin-pc", 2))
    assert not torch.equal(first, run("ddim", 1))  # the same predictor alone: the corrector did something
