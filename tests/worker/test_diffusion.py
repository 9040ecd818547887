"""The DDPM math of worker/model/diffusion.py against diffusers and against independent derivations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from worker.model.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
)

T = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.linear()


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
    )


def test_alphas_cumprod_match_ddpm_scheduler(diffusion, scheduler):
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(diffusion.betas, scheduler.betas.double().numpy(), rtol=1e-6)  # theirs: float32


@pytest.mark.parametrize(
    "name,diffusers_kwargs",
    [
        ("cosine", {"beta_schedule": "squaredcos_cap_v2"}),
        ("scaled_linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ],
)
def test_other_schedules_match_diffusers(name, diffusers_kwargs):
    from diffusers import DDPMScheduler

    ours = GaussianDiffusion.from_betas(get_named_beta_schedule(name, T))
    theirs = DDPMScheduler(num_train_timesteps=T, **diffusers_kwargs)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    assert GaussianDiffusion.from_scheduler_config(theirs.config).alphas_cumprod == pytest.approx(ours.alphas_cumprod)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        get_named_beta_schedule("sigmoid")
    with pytest.raises(ValueError, match="valid: linear, scaled_linear, squaredcos_cap_v2"):
        GaussianDiffusion.from_scheduler_config({"beta_schedule": "sigmoid", "num_train_timesteps": 10})


def test_posterior_variance_matches_ddpm_scheduler(diffusion, scheduler):
    theirs = np.array([scheduler._get_variance(t).item() for t in range(T)])
    np.testing.assert_allclose(diffusion.posterior_variance[1:], theirs[1:], rtol=0, atol=1e-6)
    # at t = 0 (the paper's t = 1) β̃ is 0; diffusers clamps it to 1e-20
    assert diffusion.posterior_variance[0] == 0.0 and theirs[0] < 1e-19


@pytest.fixture(scope="module")
def scheduler64():
    """DDPMScheduler with its coefficients in float64. In float32, diffusers' β_t = 1 − ᾱ_t/ᾱ_{t−1}
    loses ~3 digits to cancellation near t = 0 (1e-4 relative error at t = 1), which would hide
    the comparison at 1e-6; the step formula is still diffusers' own."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    s.betas = s.betas.double()
    s.alphas = 1.0 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


@pytest.mark.parametrize("t", [0, 1, 17, 500, 999])
def test_one_step_matches_ddpm_scheduler_step(diffusion, scheduler64, t):
    scheduler = scheduler64
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    theirs = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(123)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ours = diffusion.p_sample(eps, x_t, torch.full((4,), t), noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 9, 99, 499, 999])
def test_closed_form_q_matches_iterated_single_steps(diffusion, t):
    """x_t from t+1 single steps q(x_i | x_{i-1}) has the closed form's mean √ᾱ_t x_0 and variance 1 − ᾱ_t.

    Tolerances are 5 standard errors of the Monte Carlo estimates (n samples per coordinate):
    SE(mean) = √(var/n), SE(var) = var·√(2/(n−1)).
    """
    n = 10_000
    g = torch.Generator().manual_seed(1000 + t)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    x = x0.expand(n, -1).clone()
    for i in range(t + 1):
        x = diffusion.q_step(x, torch.full((n,), i), torch.randn(x.shape, generator=g, dtype=torch.float64))
    closed_mean = math.sqrt(diffusion.alphas_cumprod[t]) * x0
    closed_var = 1.0 - diffusion.alphas_cumprod[t]
    se_mean = math.sqrt(closed_var / n)
    se_var = closed_var * math.sqrt(2.0 / (n - 1))
    assert (x.mean(0) - closed_mean).abs().max().item() < 5 * se_mean
    assert (x.var(0) - closed_var).abs().max().item() < 5 * se_var
    # and q_sample draws from that same closed form
    xs = diffusion.q_sample(x0.expand(n, -1), torch.full((n,), t), torch.randn(n, 4, generator=g, dtype=torch.float64))
    assert (xs.mean(0) - closed_mean).abs().max().item() < 5 * se_mean
    assert (xs.var(0) - closed_var).abs().max().item() < 5 * se_var


def test_beta_tilde_and_mu_tilde_match_formulas_and_bayes_rule(diffusion):
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(7, 3, generator=g, dtype=torch.float64)
    for t in (1, 2, 50, 500, 999):
        ab, ab_prev, b = abar[t], abar[t - 1], betas[t]
        # the formulas of the spec
        beta_tilde = (1 - ab_prev) / (1 - ab) * b
        mu_tilde = math.sqrt(ab_prev) * b / (1 - ab) * x0 + math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * xt
        mean, var, logvar = diffusion.q_posterior_mean_variance(x0, xt, torch.full((7,), t))
        assert var[0, 0].item() == pytest.approx(beta_tilde, rel=1e-10)
        assert logvar[0, 0].item() == pytest.approx(math.log(beta_tilde), rel=1e-10)
        torch.testing.assert_close(mean, mu_tilde, rtol=1e-10, atol=1e-12)
        # Bayes' rule: prior q(x_{t-1}|x_0) = N(√ᾱ_{t-1} x_0, 1 − ᾱ_{t-1}), likelihood q(x_t|x_{t-1}) = N(√α_t x_{t-1}, β_t)
        precision = 1 / (1 - ab_prev) + (1 - b) / b
        bayes_mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - b) * xt / b) / precision
        assert var[0, 0].item() == pytest.approx(1 / precision, rel=1e-9)
        torch.testing.assert_close(mean, bayes_mean, rtol=1e-9, atol=1e-12)


def test_eps_parameterised_mean_equals_posterior_mean_for_the_true_noise(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 700, 999])
    xt = diffusion.q_sample(x0, t, noise)
    out = diffusion.p_mean_variance(noise, xt, t)
    mu_tilde, beta_tilde, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(out["mean"], mu_tilde, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["variance"], beta_tilde)
    # so every KL term of the bound is 0
    assert diffusion.vb_term(noise, x0, xt, t).abs().max().item() < 1e-9


def test_normal_kl_matches_closed_form_for_scalars():
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    expected = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    got = normal_kl(torch.tensor(m1), torch.tensor(math.log(v1)), torch.tensor(m2), torch.tensor(math.log(v2)))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    w = 2 / 255
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0, 0.9], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.45, 0.01, 0.9, 0.95, -0.8], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.1, 0.02, 0.05, 0.065, 0.03, 0.17], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    s = log_scale.exp().numpy()
    xn, mn = x.numpy(), mean.numpy()
    with np.errstate(divide="ignore"):  # index 5 underflows here; it is recomputed on its own side below
        expected = np.log(norm.cdf((xn + w / 2 - mn) / s) - norm.cdf((xn - w / 2 - mn) / s))
    expected[0] = norm.logcdf((xn[0] + w / 2 - mn[0]) / s[0])  # lowest bin extends to −∞
    expected[4] = norm.logsf((xn[4] - w / 2 - mn[4]) / s[4])  # highest bin extends to +∞
    # indices 3 and 5 lie 10 σ below / above their means: the tails must stay accurate (P ≈ 1e-24),
    # which 1 − Φ on the upper side could not give (cancellation)
    expected[5] = np.log(norm.sf((xn[5] - w / 2 - mn[5]) / s[5]) - norm.sf((xn[5] + w / 2 - mn[5]) / s[5]))
    assert expected[3] < -50 and expected[5] < -50
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # without edge bins (latents) the lowest value is an ordinary bin
    no_edge = discretized_gaussian_log_likelihood(x[:1], mean[:1], log_scale[:1], data_range=None)
    assert no_edge.item() == pytest.approx(
        math.log(norm.cdf((-1 + w / 2 + 0.9) / 0.1) - norm.cdf((-1 - w / 2 + 0.9) / 0.1)), rel=1e-6
    )


def _l0_by_quadrature(mu0: float, s: float, abar1: float, alpha1: float, eps_coef1: float, var1: float) -> float:
    """E[−log P_bin(x_0 | μ_θ(x_1), σ_1²)] over x_0 ~ N(μ0, s²), x_1 ~ q(x_1|x_0), 2-D Gauss–Hermite."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)  # ∫ f(z) e^{−z²/2} dz
    weights = weights / math.sqrt(2 * math.pi)
    z0, ze = np.meshgrid(nodes, nodes, indexing="ij")
    w2 = np.outer(weights, weights)
    x0 = mu0 + s * z0
    x1 = math.sqrt(abar1) * x0 + math.sqrt(1 - abar1) * ze
    k = math.sqrt(1 - abar1) / (abar1 * s**2 + 1 - abar1)
    eps_hat = k * (x1 - math.sqrt(abar1) * mu0)
    mean = (x1 - eps_coef1 * eps_hat) / math.sqrt(alpha1)
    sd, w = math.sqrt(var1), 2 / 255
    p = norm.cdf((x0 + w / 2 - mean) / sd) - norm.cdf((x0 - w / 2 - mean) / sd)
    return float(-(w2 * np.log(np.clip(p, 1e-300, None))).sum())  # the clip only touches nodes of weight < 1e-90


def test_vlb_of_the_perfect_eps_predictor_on_a_gaussian_equals_the_analytic_value(diffusion):
    """Data x_0 ~ N(μ0, s²) per dim; the perfect (Bayes-optimal) predictor is ε̂(x_t) = E[ε | x_t] =
    √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) · (x_t − √ᾱ_t μ0). Then, per dim,
    E L_t = (β_t²/(α_t(1−ᾱ_t))) · E(ε − ε̂)² / (2 β̃_t) with E(ε − ε̂)² = ᾱ_t s² / (ᾱ_t s² + 1 − ᾱ_t),
    L_T = ½(−log(1−ᾱ_T) + (1−ᾱ_T) + ᾱ_T(μ0² + s²) − 1), and L_0 by quadrature. All coefficients here are
    recomputed from the betas, independently of the module. The module's Monte Carlo estimate of the
    whole bound (all T terms) must agree within 5 standard errors."""
    mu0, s = 0.1, 0.2
    betas = np.linspace(1e-4, 0.02, T)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    t = np.arange(1, T)
    mse = abar[t] * s**2 / (abar[t] * s**2 + 1 - abar[t])
    kl = betas[t] ** 2 / (alphas[t] * (1 - abar[t])) * mse / (2 * beta_tilde[t])
    prior = 0.5 * (-math.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * (mu0**2 + s**2) - 1)
    l0 = _l0_by_quadrature(mu0, s, abar[0], alphas[0], betas[0] / math.sqrt(1 - abar[0]), beta_tilde[1])
    analytic_bpd = (prior + kl.sum() + l0) / math.log(2)

    n, d = 1000, 8
    g = torch.Generator().manual_seed(0)
    x0 = mu0 + s * torch.randn(n, d, generator=g, dtype=torch.float64)
    sqrt_abar = torch.from_numpy(np.sqrt(abar))

    def perfect_eps(x_t, tt):
        a = (sqrt_abar[tt] ** 2)[:, None]
        return torch.sqrt(1 - a) / (a * s**2 + 1 - a) * (x_t - torch.sqrt(a) * mu0)

    out = diffusion.vlb_terms_bpd(perfect_eps, x0, generator=torch.Generator().manual_seed(1))
    est = out["total_bpd"]
    se = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - analytic_bpd) < 5 * se + 1e-6
    # and the bound is an upper bound on the exact NLL of the discretised Gaussian data (per dim)
    exact_nll_bpd = (0.5 * math.log(2 * math.pi * math.e * s**2) - math.log(2 / 255)) / math.log(2)
    assert analytic_bpd > exact_nll_bpd
    # a predictor that is off by a constant pays for it (same noise: a paired comparison)
    worse = diffusion.vlb_terms_bpd(
        lambda x, tt: perfect_eps(x, tt) + 0.1, x0, generator=torch.Generator().manual_seed(1)
    )["total_bpd"]
    diff = worse - est
    assert diff.mean().item() > 5 * diff.std().item() / math.sqrt(n)


def test_vlb_estimate_from_a_subset_of_terms_is_unbiased(diffusion):
    g = torch.Generator().manual_seed(3)
    x0 = 0.3 * torch.randn(64, 4, generator=g, dtype=torch.float64)
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731  (any fixed predictor)
    exact = diffusion.vlb_terms_bpd(eps_fn, x0, generator=g)["total_bpd"].mean().item()
    estimates = []
    for seed in range(200):
        tg = torch.Generator().manual_seed(seed)
        ts = torch.randperm(T, generator=tg)[:20]
        estimates.append(diffusion.vlb_terms_bpd(eps_fn, x0, timesteps=ts, generator=tg)["total_bpd"].mean().item())
    estimates = np.array(estimates)
    assert abs(estimates.mean() - exact) < 5 * estimates.std() / math.sqrt(len(estimates))


def test_l_simple_and_snr(diffusion):
    eps = torch.zeros(2, 3, 4, 4)
    noise = torch.ones(2, 3, 4, 4)
    noise[1] *= 2
    assert diffusion.l_simple(eps, noise).tolist() == [1.0, 4.0]
    t = torch.tensor([0, 999])
    snr = diffusion.snr(t)
    assert snr[0].item() == pytest.approx((1 - 1e-4) / 1e-4, rel=1e-5)
    assert snr[1].item() == pytest.approx(diffusion.alphas_cumprod[-1] / (1 - diffusion.alphas_cumprod[-1]), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Algorithm 2, the whole loop, against diffusers' DDPMScheduler loop with the same noise
# --------------------------------------------------------------------------------------------


def _eps_fn(x_t, t):
    """A deterministic, x- and t-dependent stand-in for ε_θ (no training needed to compare loops)."""
    return torch.tanh(0.7 * x_t + torch.sin(t.to(x_t.dtype) / 97.0).reshape(-1, *([1] * (x_t.ndim - 1))))


def _diffusers_loop(scheduler, x_T, steps, seed):
    """diffusers' own sampling loop (as StableDiffusionPipeline runs it): every x_{t-1}, keyed by t."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x, out = x_T, {}
    for t in scheduler.timesteps:
        eps = _eps_fn(x, torch.full((x.shape[0],), int(t))).to(x.dtype)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
        out[int(t)] = x
    return out


def _ddpm_scheduler(variance_type, spacing, dtype):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=False, variance_type=variance_type, timestep_spacing=spacing)
    if dtype == torch.float64:  # diffusers keeps its coefficients in float32; compare the math in float64
        s.betas = s.betas.double()
        s.alphas = 1.0 - s.betas
        s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
        s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


@pytest.mark.parametrize("variance_type,steps,spacing,dtype,tol", [
    ("fixed_small", 1000, "leading", torch.float64, 1e-9),  # the seed's loop: every t from T to 1
    ("fixed_large", 1000, "leading", torch.float64, 1e-9),  # σ_t² = β_t
    ("fixed_small", 50, "leading", torch.float64, 1e-9),  # respaced
    ("fixed_small", 20, "trailing", torch.float64, 1e-9),  # what ldmq's models sample with
    ("fixed_small", 20, "trailing", torch.float32, 1e-5),  # ... and in the precision they sample in
])
def test_ancestral_sample_matches_the_ddpm_scheduler_loop_step_by_step(variance_type, steps, spacing, dtype, tol):
    """The same x_{t-1} at every t as diffusers' loop fed the same noise. In float64 to 1e-9: the same
    math. In float32 the two orders of operations round differently: relative 1e-5 over 20 steps (this
    stand-in ε is no denoiser, x grows to ~300; over 1000 float32 steps the rounding grows to 3e-2)."""
    scheduler = _ddpm_scheduler(variance_type, spacing, dtype)
    ours_diffusion = GaussianDiffusion.from_betas(scheduler.betas.double().numpy())
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    theirs = _diffusers_loop(scheduler, x_T, steps, seed=11)
    assert len(theirs) == steps
    g = torch.Generator().manual_seed(11)  # the same per-step noise, in the same order
    ours = {}
    x0 = ours_diffusion.ancestral_sample(
        _eps_fn, x_T, noise=lambda shape: torch.randn(shape, generator=g, dtype=dtype), timesteps=list(theirs),
        variance_type=variance_type, on_step=lambda i, t, x: ours.__setitem__(t, x),
    )
    assert list(ours) == list(theirs)  # the same t, in the same (descending) order
    for t in theirs:
        torch.testing.assert_close(ours[t], theirs[t], rtol=tol, atol=tol, msg=f"x_(t-1) at t={t}")
    torch.testing.assert_close(x0, theirs[min(theirs)], rtol=tol, atol=tol)


def test_ancestral_sample_depends_on_the_noise_and_the_variance():
    d = GaussianDiffusion.linear()
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))

    def run(seed, vt="fixed_small"):
        g = torch.Generator().manual_seed(seed)
        return d.ancestral_sample(_eps_fn, x_T, noise=lambda s: torch.randn(s, generator=g), timesteps=range(0, T, 100),
                                  variance_type=vt)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert not torch.allclose(run(1), run(1, "fixed_large"))
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        run(1, "learned")


def test_respaced_process_keeps_the_chosen_alphas_cumprod(diffusion):
    taus = [9, 99, 499, 999]
    spaced = diffusion.respaced(taus)
    np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[taus], rtol=1e-12)
    assert spaced.num_timesteps == 4
    with pytest.raises(ValueError, match="ascending"):
        diffusion.respaced([5, 3])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_eps_from_other_parameterisations(diffusion, prediction_type):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    a = torch.from_numpy(diffusion.sqrt_alphas_cumprod)[t, None]
    s = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod)[t, None]
    output = a * eps - s * x0 if prediction_type == "v_prediction" else x0
    torch.testing.assert_close(diffusion.eps_from_prediction(output, x_t, t, prediction_type), eps)


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_train_step_is_algorithm_1(diffusion, gamma):
    import copy

    from worker.model.diffusion import train_step

    torch.manual_seed(0)
    net = torch.nn.Linear(6, 6)
    before = copy.deepcopy(net)
    x0 = torch.randn(8, 6)
    seen, stepped = {}, []

    def eps_fn(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return net(x_t)

    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def gradient_step(loss):
        stepped.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()

    loss = train_step(diffusion, eps_fn, x0, generator=torch.Generator().manual_seed(3), gradient_step=gradient_step,
                      min_snr_gamma=gamma)
    # the same draws, in the same order: t ~ U{0..T-1}, then ε ~ N(0, I); x_t by the closed form
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, T, (8,), generator=g)
    eps = torch.randn(8, 6, generator=g)
    assert torch.equal(seen["t"], t)
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(seen["x_t"], x_t)
    with torch.no_grad():
        per_example = ((eps - before(x_t)) ** 2).mean(dim=1)  # ‖ε − ε_θ(x_t, t)‖² per example
        if gamma is not None:
            snr = torch.from_numpy(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))[t].float()
            per_example = per_example * torch.minimum(snr, torch.tensor(gamma)) / snr
    assert loss.item() == pytest.approx(per_example.mean().item(), rel=1e-6)
    assert stepped == [pytest.approx(loss.item())]  # exactly one gradient step, on that loss
    assert not torch.equal(net.weight, before.weight)
