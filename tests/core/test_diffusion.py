"""Gaussian diffusion maths checked against ADM_SPEC §1, §3, §4 and independent derivations."""

import math

import numpy as np
import pytest
import torch

from diffusion_core.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    PerSampleNoise,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
)

LN2 = math.log(2.0)


def bayes_posterior(betas):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on the two Gaussians (not the closed forms of §1).

    Precision = alpha_t / beta_t + 1 / (1 - abar_{t-1}); the mean is variance times the sum of
    precision-weighted means. Returns (variance, coef_x0, coef_xt) for t >= 1.
    """
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = abar[:-1]
    a, b = alphas[1:], betas[1:]
    var = 1.0 / (a / b + 1.0 / (1.0 - abar_prev))
    coef_x0 = var * np.sqrt(abar_prev) / (1.0 - abar_prev)
    coef_xt = var * np.sqrt(a) / b
    return var, coef_x0, coef_xt


def tanh_cdf(z):
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


# ---------------------------------------------------------------------------- config


def test_config_builds_the_same_process():
    cfg = DiffusionConfig(noise_schedule="cosine", timestep_respacing="50")
    a, b = cfg.build(), create_diffusion(noise_schedule="cosine", timestep_respacing="50")
    assert a.num_timesteps == b.num_timesteps == 50
    np.testing.assert_array_equal(a.betas, b.betas)
    with pytest.raises(Exception):
        cfg.steps = 10  # frozen
    assert DiffusionConfig().learn_sigma is True and DiffusionConfig().steps == 1000


# ---------------------------------------------------------------------------- schedules


def test_linear_schedule_end_points():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and len(betas) == 1000
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # Other T keep the continuous-time endpoints: scaled by 1000/T.
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_cap_only_at_last_beta():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.dtype == np.float64
    assert betas[-1] == 0.999
    assert betas[:-1].max() < 0.999
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert betas[0] == pytest.approx(1 - f(0.001) / f(0.0), rel=1e-12)
    assert betas[500] == pytest.approx(1 - f(0.501) / f(0.5), rel=1e-12)


def test_derived_tables():
    d = create_diffusion(noise_schedule="linear")
    assert d.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    np.testing.assert_array_equal(d.alphas_cumprod_next[:-1], d.alphas_cumprod[1:])
    assert d.alphas_cumprod_next[-1] == 0.0
    assert d.alphas_cumprod[0] == 1 - 1e-4
    # Clipped log variance: t = 0 borrows t = 1 (the true posterior variance at t = 0 is 0).
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == math.log(d.posterior_variance[1])
    np.testing.assert_array_equal(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))


@pytest.mark.parametrize("schedule, respacing", [("linear", ""), ("cosine", ""), ("linear", "ddim50")])
def test_posterior_coefficients_match_bayes(schedule, respacing):
    d = create_diffusion(noise_schedule=schedule, timestep_respacing=respacing)
    var, c0, ct = bayes_posterior(d.betas)
    np.testing.assert_allclose(d.posterior_variance[1:], var, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef1[1:], c0, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:], ct, rtol=1e-9)
    # t = 0: the posterior collapses onto x_0.
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert d.posterior_mean_coef2[0] == 0.0

    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    xt = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, d.num_timesteps // 2, d.num_timesteps - 1])
    mean, variance, log_variance = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        expected = c0[ti - 1] * x0[i] + ct[ti - 1] * xt[i]
        torch.testing.assert_close(mean[i], expected, rtol=1e-10, atol=1e-12)
        assert torch.all(variance[i] == var[ti - 1] * (1 + 0 * variance[i])) or torch.allclose(
            variance[i], torch.full_like(variance[i], var[ti - 1]), rtol=1e-10
        )
        assert torch.allclose(log_variance[i], torch.full_like(log_variance[i], math.log(var[ti - 1])), rtol=1e-9)


def test_q_sample_statistics():
    d = create_diffusion()
    torch.manual_seed(0)
    n = 40000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    for step in (0, 250, 999):
        t = torch.full((n,), step)
        xt = d.q_sample(x0, t).flatten().double()
        abar = d.alphas_cumprod[step]
        std = math.sqrt(1 - abar)
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.5) < 5 * std / math.sqrt(n)
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)
    # A given noise tensor is used as is.
    noise = torch.randn(2, 3, 4, 4)
    x0 = torch.rand(2, 3, 4, 4)
    t = torch.tensor([10, 700])
    out = d.q_sample(x0, t, noise=noise)
    ab = torch.tensor(d.alphas_cumprod[[10, 700]], dtype=torch.float32).view(2, 1, 1, 1)
    torch.testing.assert_close(out, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


# ---------------------------------------------------------------------------- decoder at t = 0


def test_decoder_edge_and_interior_bins():
    s = 0.01
    log_scale = torch.tensor(math.log(s), dtype=torch.float64)
    x = torch.tensor([-1.0, 1.0, 0.0, 2 * 100 / 255 - 1], dtype=torch.float64)
    means = torch.tensor([-0.99, 0.995, 0.003, 2 * 100 / 255 - 1], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, log_scale).tolist()
    half = 1 / 255
    # Edge bins are open-ended: P(X <= -1 + 1/255) and P(X >= 1 - 1/255).
    assert got[0] == pytest.approx(math.log(tanh_cdf((-1 + half + 0.99) / s)), rel=1e-12)
    assert got[1] == pytest.approx(math.log(1 - tanh_cdf((1 - half - 0.995) / s)), rel=1e-12)
    # Interior bins: CDF difference over [x - 1/255, x + 1/255].
    assert got[2] == pytest.approx(math.log(tanh_cdf((half - 0.003) / s) - tanh_cdf((-half - 0.003) / s)), rel=1e-12)
    centred = tanh_cdf(half / s) - tanh_cdf(-half / s)
    assert got[3] == pytest.approx(math.log(centred), rel=1e-12)
    # The tanh CDF is within 2e-4 of the true normal CDF.
    assert abs(centred - math.erf(half / s / math.sqrt(2))) < 2e-4


def test_decoder_clamps_at_1e12():
    log_scale = torch.tensor(math.log(1e-3), dtype=torch.float64)
    x = torch.tensor([-1.0, 1.0, -0.5], dtype=torch.float64)
    means = torch.tensor([1.0, -1.0, 0.9], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, log_scale)
    torch.testing.assert_close(got, torch.full_like(got, math.log(1e-12)))


def test_decoder_bins_sum_to_one():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean = torch.full_like(values, 0.3)
    log_scale = torch.full_like(values, math.log(0.2))
    probs = discretized_gaussian_log_likelihood(values, mean, log_scale).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-10)


# ---------------------------------------------------------------------------- loss


class LinearModel(torch.nn.Module):
    """eps_hat = a * x, v = b (learned-range channels): two parameters to follow gradients."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.learn_sigma = learn_sigma

    def forward(self, x, t, **kwargs):
        eps = self.a.to(x.dtype) * x
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, self.b.to(x.dtype) * torch.ones_like(x)], dim=1)


def test_vb_matches_closed_form_kl_and_decoder():
    d = create_diffusion(steps=1000, learn_sigma=True)
    model = LinearModel()
    torch.manual_seed(1)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4)) / 127.5 - 1).double()
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 600])
    out = d.training_losses(model, x0, t, noise=noise)
    betas = d.betas
    var, c0, ct = bayes_posterior(betas)
    for i, ti in enumerate(t.tolist()):
        ab = d.alphas_cumprod[ti]
        xt = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        eps_hat = 0.7 * xt
        x0_hat = xt / math.sqrt(ab) - math.sqrt(1 / ab - 1) * eps_hat  # no clipping in the loss
        frac = (0.3 + 1) / 2
        min_log = math.log(var[0]) if ti == 0 else math.log(var[ti - 1])
        log_var = frac * math.log(betas[ti]) + (1 - frac) * min_log
        mse = ((noise[i] - eps_hat) ** 2).mean().item()
        if ti == 0:
            model_mean = x0_hat  # coef1 = 1, coef2 = 0 at t = 0
            s = math.exp(0.5 * log_var)
            half = 1 / 255
            nll = []
            for xv, mv in zip(x0[i].flatten().tolist(), model_mean.flatten().tolist()):
                if xv < -0.999:
                    p = tanh_cdf((xv - mv + half) / s)
                elif xv > 0.999:
                    p = 1 - tanh_cdf((xv - mv - half) / s)
                else:
                    p = tanh_cdf((xv - mv + half) / s) - tanh_cdf((xv - mv - half) / s)
                nll.append(-math.log(max(p, 1e-12)))
            expected_vb = float(np.mean(nll)) / LN2
        else:
            true_mean = c0[ti - 1] * x0[i] + ct[ti - 1] * xt
            true_var = var[ti - 1]
            model_mean = c0[ti - 1] * x0_hat + ct[ti - 1] * xt
            model_var = math.exp(log_var)
            kl = 0.5 * (math.log(model_var / true_var) + true_var / model_var - 1) + (
                (true_mean - model_mean) ** 2 / (2 * model_var)
            )
            expected_vb = kl.mean().item() / LN2
        assert out["vb"][i].item() == pytest.approx(expected_vb, rel=1e-9)
        assert out["mse"][i].item() == pytest.approx(mse, rel=1e-12)
        assert out["loss"][i].item() == pytest.approx(mse + expected_vb, rel=1e-9)


def test_vb_trains_only_the_variance_channels():
    d = create_diffusion(steps=100)
    model = LinearModel()
    x0 = torch.rand(4, 2, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 3, 50, 99])
    out = d.training_losses(model, x0, t)
    (grad_a, grad_b) = torch.autograd.grad(
        out["vb"].sum(), [model.a, model.b], allow_unused=True, retain_graph=True
    )
    assert grad_a is None or grad_a.abs().item() == 0.0
    assert grad_b.abs().item() > 0
    (grad_a,) = torch.autograd.grad(out["mse"].sum(), [model.a])
    assert grad_a.abs().item() > 0


def test_loss_types():
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 20, 99])
    noise = torch.randn_like(x0)
    model = LinearModel()
    plain = create_diffusion(steps=100).training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion(steps=100, rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.1)  # T / 1000
    torch.testing.assert_close(rescaled["loss"], plain["mse"] + 0.1 * plain["vb"])
    # use_kl selects the rescaled KL (vb x T) whatever rescale_learned_sigmas says, as the original.
    for rescale in (False, True):
        kl = create_diffusion(steps=100, use_kl=True, rescale_learned_sigmas=rescale)
        assert kl.loss_type == "rescaled_kl"
        out = kl.training_losses(model, x0, t, noise=noise)
        torch.testing.assert_close(out["loss"], 100 * plain["vb"])
        torch.testing.assert_close(out["vb"], plain["vb"])
    # Fixed variance: the loss is the MSE alone.
    fixed = create_diffusion(steps=100, learn_sigma=False).training_losses(
        LinearModel(learn_sigma=False), x0, t, noise=noise
    )
    torch.testing.assert_close(fixed["loss"], fixed["mse"])
    assert fixed["vb"].shape == (3,)
    # x0 prediction regresses x_0 instead of eps.
    xs = create_diffusion(steps=100, learn_sigma=False, predict_xstart=True)
    out = xs.training_losses(LinearModel(learn_sigma=False), x0, t, noise=noise)
    xt = xs.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(out["mse"], ((x0 - 0.7 * xt) ** 2).mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------- p_mean_variance


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variances(sigma_small):
    d = create_diffusion(steps=50, learn_sigma=False, sigma_small=sigma_small)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 7])
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    if sigma_small:
        expected = [d.posterior_variance[0], d.posterior_variance[7]]
        expected_log = [math.log(d.posterior_variance[1]), math.log(d.posterior_variance[7])]
    else:
        # Fixed large: beta_t, but t = 0 uses the posterior variance of t = 1.
        expected = [d.posterior_variance[1], d.betas[7]]
        expected_log = [math.log(d.posterior_variance[1]), math.log(d.betas[7])]
    for i in range(2):
        assert torch.allclose(out["variance"][i], torch.tensor(expected[i], dtype=torch.float64))
        assert torch.allclose(out["log_variance"][i], torch.tensor(expected_log[i], dtype=torch.float64))
    assert out["variance"].shape == x.shape


def test_xstart_prediction_and_clipping():
    d = create_diffusion(steps=50, learn_sigma=False, predict_xstart=True)
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([3, 40])
    out = d.p_mean_variance(lambda x, t: 3 * torch.ones_like(x), x, t)
    assert torch.all(out["pred_xstart"] == 1.0)
    raw = d.p_mean_variance(lambda x, t: 3 * torch.ones_like(x), x, t, clip_denoised=False)
    assert torch.all(raw["pred_xstart"] == 3.0)
    c1 = torch.tensor(d.posterior_mean_coef1[[3, 40]], dtype=torch.float32).view(2, 1, 1, 1)
    c2 = torch.tensor(d.posterior_mean_coef2[[3, 40]], dtype=torch.float32).view(2, 1, 1, 1)
    torch.testing.assert_close(out["mean"], c1 * 1.0 + c2 * x)


def test_float64_paths_and_low_precision_model_output():
    d = create_diffusion(timestep_respacing="20")
    x32 = torch.randn(2, 3, 4, 4)
    x64 = x32.double()
    t = torch.tensor([0, 19])
    model = lambda x, t: torch.cat([0.5 * x, 0.2 * torch.ones_like(x)], dim=1)  # noqa: E731
    out64 = d.p_sample(model, x64, t, noise=torch.ones_like(x64))
    out32 = d.p_sample(model, x32, t, noise=torch.ones_like(x32))
    assert out64["sample"].dtype == torch.float64 and out32["sample"].dtype == torch.float32
    torch.testing.assert_close(out32["sample"].double(), out64["sample"], rtol=1e-5, atol=1e-5)
    loss64 = d.training_losses(model, x64.clamp(-1, 1), t)
    assert all(v.dtype == torch.float64 for v in loss64.values())
    # A bf16 answer from the network (autocast) is cast to x's dtype before the maths.
    bf16_model = lambda x, t: model(x, t).to(torch.bfloat16)  # noqa: E731
    out = d.p_mean_variance(bf16_model, x32, t)
    assert all(v.dtype == torch.float32 for v in out.values())


# ---------------------------------------------------------------------------- DDIM


def gaussian_eps_model(diffusion_orig, scale):
    """Exact eps predictor for data ~ N(0, scale^2 I): eps = sqrt(1-abar) x / (abar s^2 + 1 - abar)."""
    abar = torch.tensor(diffusion_orig.alphas_cumprod)

    def model(x, t, **kwargs):
        a = abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x / (a * scale**2 + 1 - a)

    return model


def test_ddim_eta0_is_deterministic_and_uses_no_noise():
    d = create_diffusion(timestep_respacing="ddim25", learn_sigma=False)
    model = gaussian_eps_model(create_diffusion(learn_sigma=False), 0.5)
    x_T = torch.randn(3, 2, 4, 4)

    def forbidden(like):
        raise AssertionError("eta = 0 must not draw noise")

    a = d.ddim_sample_loop(model, x_T.shape, noise=x_T, step_noise=forbidden)
    torch.manual_seed(123)
    b = d.ddim_sample_loop(model, x_T.shape, noise=x_T)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_reverse_then_forward_recovers_input():
    d = create_diffusion(steps=1000, learn_sigma=False, timestep_respacing="ddim50")
    # With eps independent of x and t one reverse and one forward step invert each other exactly.
    e = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    const = lambda x, t: e  # noqa: E731
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64) * 0.3
    t = torch.tensor([10, 30])
    up = d.ddim_reverse_sample(const, x, t, clip_denoised=False)["sample"]
    back = d.ddim_sample(const, up, t + 1, clip_denoised=False)["sample"]
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    # For a smooth model the encode/decode round trip converges to x0 at first order in the
    # step size (the ODE discretisation error): 5x the steps, about 1/5 the error.
    model = gaussian_eps_model(create_diffusion(learn_sigma=False), 0.5)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64) * 0.5
    errors = []
    for respacing in ("50", "250"):
        chain = create_diffusion(learn_sigma=False, timestep_respacing=respacing)
        x_T = chain.ddim_reverse_sample_loop(model, x0, clip_denoised=False)
        rec = chain.ddim_sample_loop(model, x0.shape, noise=x_T, clip_denoised=False)
        errors.append((rec - x0).abs().max().item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.05
    with pytest.raises(ValueError, match="eta must be 0"):
        d.ddim_reverse_sample(const, x, t, eta=0.5)


def test_ddim_eta1_step_formula():
    d = create_diffusion(steps=100, learn_sigma=False)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    z = torch.randn_like(x)
    eps = torch.randn_like(x) * 0.1
    t = torch.tensor([5, 80])
    out = d.ddim_sample(lambda x, t: eps, x, t, eta=1.0, noise=z)
    for i, ti in enumerate(t.tolist()):
        ab, abp = d.alphas_cumprod[ti], d.alphas_cumprod_prev[ti]
        x0 = (x[i] / math.sqrt(ab) - math.sqrt(1 / ab - 1) * eps[i]).clamp(-1, 1)
        e = (x[i] / math.sqrt(ab) - x0) / math.sqrt(1 / ab - 1)
        sigma = math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
        # eta = 1 gives the DDPM posterior standard deviation.
        assert sigma**2 == pytest.approx(d.posterior_variance[ti], rel=1e-9)
        expected = math.sqrt(abp) * x0 + math.sqrt(1 - abp - sigma**2) * e + sigma * z[i]
        torch.testing.assert_close(out["sample"][i], expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- randomness


def test_per_sample_noise_makes_results_batch_independent():
    d = create_diffusion(timestep_respacing="10", learn_sigma=False)
    model = gaussian_eps_model(create_diffusion(learn_sigma=False), 0.5)
    seeds = [10, 11, 12, 13]
    shape = (4, 2, 3, 3)

    def run(batch_seeds):
        noise = PerSampleNoise(batch_seeds)
        x_T = noise.initial((len(batch_seeds),) + shape[1:])
        return d.p_sample_loop(model, x_T.shape, noise=x_T, step_noise=noise)

    whole = run(seeds)
    halves = torch.cat([run(seeds[:2]), run(seeds[2:])])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)
    assert not torch.allclose(whole[0], whole[1])
    # step_noise is called once per step with noise (t > 0) and supplies x_T when noise is None.
    calls = []

    def counting(like):
        calls.append(like.shape)
        return torch.zeros_like(like)

    out = d.p_sample_loop(model, shape, step_noise=counting)
    assert len(calls) == 1 + 9 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="one seed per sample"):
        PerSampleNoise([1, 2])(torch.zeros(3, 1))


# ---------------------------------------------------------------------------- bits per dim


def test_calc_bpd_loop():
    d = create_diffusion(steps=30)
    model = LinearModel()
    x0 = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 2 - 1
    out = d.calc_bpd_loop(model, x0)
    assert out["vb"].shape == (2, 30) and out["mse"].shape == (2, 30)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # Column i is timestep i: recompute column 0 (the decoder term) with the same noise.
    noise = PerSampleNoise([5, 6])
    out = d.calc_bpd_loop(model, x0, clip_denoised=False, step_noise=noise)
    first = PerSampleNoise([5, 6])(x0)
    x_t = d.q_sample(x0, torch.zeros(2, dtype=torch.long), noise=first)
    vb0 = d.vb_terms_bpd(model, x0, x_t, torch.zeros(2, dtype=torch.long), clip_denoised=False)["output"]
    torch.testing.assert_close(out["vb"][:, 0], vb0)
    # Prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, in bits.
    ab = d.alphas_cumprod[-1]
    kl = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2)
    torch.testing.assert_close(out["prior_bpd"], kl.mean(dim=(1, 2, 3)) / LN2)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_problem():
    d = create_diffusion(timestep_respacing="25")
    x = torch.zeros(2, 3, 4, 4)
    model = lambda x, t: torch.zeros(x.shape[0], 6, 4, 4)  # noqa: E731
    with pytest.raises(ValueError, match=r"timesteps out of range.*25 steps"):
        d.p_sample(model, x, torch.tensor([0, 25]))
    with pytest.raises(ValueError, match="out of range"):
        d.q_sample(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        d.p_mean_variance(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        d.training_losses(model, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="2\\*C = 6 channels"):
        d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x, torch.tensor([0, 1]), noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        create_diffusion(steps=0)
    with pytest.raises(ValueError, match="linear schedule needs steps > 20"):
        create_diffusion(steps=20)
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion(np.linspace(1e-4, 0.02, 10), model_var_type="learned")
