"""DPM-Solver++ checked against an independent numpy transcription of FAST_SAMPLERS.md, DDIM, and
the guidance plumbing (classifier, classifier-free, intervals), plus a run with the tiny networks."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_core import presets
from diffusion_core.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule
from diffusion_core.dpm_solver import (
    ContinuousSchedule,
    dpm_solver_sample_loop,
    dynamic_threshold,
    step_orders,
    time_grid,
)
from diffusion_core.guidance import ClassifierFreeGuidance, classifier_cond_fn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHAPE = (2, 3, 4, 4)
_g = torch.Generator().manual_seed(0)
W = torch.randn(SHAPE, generator=_g, dtype=torch.float64)
X_T = torch.randn(SHAPE, generator=_g, dtype=torch.float64)


# ---------------------------------------------------------------------------- fixed linear models
# Each is affine in x with a t-dependent offset, so the numpy reference can evaluate it exactly.
# eps close to x keeps the samples O(1) (a stronger contraction lets them grow to ~100).


def eps_np(x, t):
    return 0.9 * x + 0.5 * W.numpy() * (t / 1000.0) + 0.05


def x0_np(x, t):
    return 0.4 * x - W.numpy() * (t / 1000.0)


def grad_np(x, t):
    return 0.2 * x - 0.1 * W.numpy() + 1e-4 * t


def _torch_of(fn, float_times=True):
    def model(x, t, **kwargs):
        assert t.dtype == (torch.float32 if float_times else torch.int64) and t.shape == (x.shape[0],)
        assert torch.all(t == t[0])
        return torch.from_numpy(fn(x.numpy(), float(t[0]))).to(x.dtype)

    return model


class Recorder:
    """Wraps a model or cond_fn and records the times of each call."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t, **kwargs):
        self.times.append(t.clone())
        return self.fn(x, t, **kwargs)


# ---------------------------------------------------------------------------- the reference


def reference_dpm_solver(abar, x_T, predict, steps, order, skip_type, lower_order_final=True,
                         predicts_x0=False, grad=None, threshold=False, start_timestep=None):
    """DPM-Solver++ straight from FAST_SAMPLERS.md in numpy float64; np.interp for the tables.
    The grid starts at `start_timestep`, or where the reference starts: lambda = -5.1 if the
    schedule goes below it, else t = 1.

    Returns the final x and the network times of the calls.
    """
    N = len(abar)
    t_tab = np.arange(1, N + 1) / N
    la_tab = 0.5 * np.log(abar)

    def log_alpha(t):
        return np.interp(t, t_tab, la_tab)

    def lam(t):
        la = log_alpha(t)
        return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))

    def t_of_lam(lv):
        la = -0.5 * np.log1p(np.exp(-2.0 * lv))
        return np.interp(la, la_tab[::-1], t_tab[::-1])

    M, k, t_end = steps, np.arange(steps + 1), 1.0 / N
    if start_timestep is not None:
        t0 = (start_timestep + 1.0) / N
    else:
        t0 = 1.0 if lam(1.0) >= -5.1 else t_of_lam(-5.1)
    if skip_type == "time_uniform":
        ts = t0 + (t_end - t0) * k / M
    elif skip_type == "logSNR":
        ts = t_of_lam(lam(t0) + (lam(t_end) - lam(t0)) * k / M)
    else:
        ts = (np.sqrt(t0) + (np.sqrt(t_end) - np.sqrt(t0)) * k / M) ** 2
    alpha = np.exp(log_alpha(ts))
    sigma = np.sqrt(1.0 - alpha**2)
    lams = np.log(alpha / sigma)
    times = []

    def data_prediction(x, i):
        t_in = float(np.float32(1000.0 * (ts[i] - 1.0 / N)))
        times.append(t_in)
        out = predict(x, t_in)
        g = 0.0 if grad is None else grad(x, t_in)
        if predicts_x0:
            eps = (x - alpha[i] * out) / sigma[i]
        else:
            eps = out
        x0 = (x - sigma[i] * (eps - sigma[i] * g)) / alpha[i]
        if threshold:
            s = np.maximum(np.quantile(np.abs(x0).reshape(len(x0), -1), 0.995, axis=1), 1.0)
            s = s.reshape(-1, *([1] * (x0.ndim - 1)))
            x0 = np.clip(x0, -s, s) / s
        return x0

    x = x_T.copy()
    preds = [data_prediction(x, 0)]
    for i in range(1, M + 1):
        step_order = 1 if i == 1 else order
        if lower_order_final and M < 10:
            step_order = min(step_order, M + 1 - i)
        h = lams[i] - lams[i - 1]
        phi = np.expm1(-h)
        x_new = sigma[i] / sigma[i - 1] * x - alpha[i] * phi * preds[-1]
        if step_order == 2:
            r = (lams[i - 1] - lams[i - 2]) / h
            x_new = x_new - 0.5 * alpha[i] * phi * (preds[-1] - preds[-2]) / r
        x = x_new
        if i < M:
            preds.append(data_prediction(x, i))
    return x, times


def _compare(diffusion, steps, order, skip_type, *, lower_order_final=True, predicts_x0=False,
             with_grad=False, threshold=False, start_timestep=None):
    fn = x0_np if predicts_x0 else eps_np
    model, cond_fn = Recorder(_torch_of(fn)), (Recorder(_torch_of(grad_np)) if with_grad else None)
    got = dpm_solver_sample_loop(
        diffusion, model, SHAPE, noise=X_T.clone(), cond_fn=cond_fn, steps=steps, order=order,
        skip_type=skip_type, lower_order_final=lower_order_final, thresholding=threshold,
        start_timestep=start_timestep,
    )
    want, times = reference_dpm_solver(
        diffusion.alphas_cumprod, X_T.numpy(), fn, steps, order, skip_type, lower_order_final,
        predicts_x0, grad_np if with_grad else None, threshold, start_timestep,
    )
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    assert [float(t[0]) for t in model.times] == times
    assert len(model.times) == steps
    if cond_fn is not None:
        assert len(cond_fn.times) == steps
    return model


LINEAR = create_diffusion(learn_sigma=False)
COSINE = create_diffusion(noise_schedule="cosine", learn_sigma=False)


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_matches_reference(steps, order, skip_type):
    _compare(LINEAR, steps, order, skip_type)


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
def test_matches_reference_cosine(skip_type):
    """Cosine schedule: by default the first evaluation is at lambda = -5.1 (index 995.08, where the
    reference starts) with true time labels; an explicit start_timestep overrides it (999: the whole
    table; 960: where DDIM-25's respacing starts)."""
    model = _compare(COSINE, 7, 2, skip_type, with_grad=True)
    assert float(model.times[0][0]) == pytest.approx(995.0773, abs=1e-3)
    whole = _compare(COSINE, 7, 2, skip_type, with_grad=True, start_timestep=999)
    assert float(whole.times[0][0]) == 999.0
    later = _compare(COSINE, 5, 2, skip_type, start_timestep=960.0)
    assert float(later.times[0][0]) == 960.0
    # Linear schedule: lambda(999) = -5.06, so the default is the whole table.
    assert float(_compare(LINEAR, 3, 2, skip_type).times[0][0]) == 999.0


def test_start_timestep_is_checked():
    for bad in (0, -1.0, 1000, float("nan"), True, "960"):
        with pytest.raises(ValueError, match="start_timestep must be an original timestep in \\(0, 999\\]"):
            dpm_solver_sample_loop(LINEAR, _torch_of(eps_np), SHAPE, noise=X_T.clone(), steps=3, start_timestep=bad)


def test_lower_order_final_rule():
    assert step_orders(5, 2) == [1, 2, 2, 2, 1]
    assert step_orders(5, 2, lower_order_final=False) == [1, 2, 2, 2, 2]
    assert step_orders(9, 2)[-1] == 1 and step_orders(10, 2) == [1] + [2] * 9
    assert step_orders(1, 2) == [1] and step_orders(4, 1) == [1] * 4
    for lof in (True, False):
        _compare(LINEAR, 5, 2, "logSNR", lower_order_final=lof)


def test_guided_and_x0_prediction_match_reference():
    _compare(LINEAR, 6, 2, "time_uniform", with_grad=True)
    xstart = create_diffusion(learn_sigma=False, predict_xstart=True)
    _compare(xstart, 6, 2, "time_quadratic", predicts_x0=True)
    _compare(xstart, 6, 2, "logSNR", predicts_x0=True, with_grad=True)


def test_thresholding_matches_reference():
    _compare(LINEAR, 6, 2, "time_uniform", threshold=True)
    _compare(LINEAR, 4, 1, "logSNR", threshold=True, with_grad=True)
    x0 = torch.cat([torch.linspace(-3, 3, 48).view(1, 3, 4, 4), 0.5 * torch.ones(1, 3, 4, 4)]).double()
    s = torch.quantile(x0[0].abs().flatten(), 0.995)
    out = dynamic_threshold(x0)
    torch.testing.assert_close(out[0], x0[0].clamp(-s, s) / s)
    torch.testing.assert_close(out[1], x0[1])  # quantile below 1: s = 1, unchanged


# ---------------------------------------------------------------------------- schedule, grid, times


def test_schedule_tables_and_inverse():
    sched = ContinuousSchedule.from_diffusion(LINEAR)
    n = np.arange(1000)
    np.testing.assert_allclose(sched.alpha((n + 1) / 1000) ** 2, LINEAR.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(sched.network_time((n + 1) / 1000), n, atol=1e-9)
    t = np.array([9e-4, 1e-3, 0.0123, 0.5, 0.98765, 1.0, 1.01])  # both ends extrapolated too
    np.testing.assert_allclose(sched.t_of_lambda(sched.lam(t)), t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sched.sigma(t) ** 2 + sched.alpha(t) ** 2, 1.0, rtol=1e-12)
    for skip_type in ("time_uniform", "logSNR", "time_quadratic"):
        grid = time_grid(sched, 7, skip_type)
        assert len(grid) == 8 and grid[0] == 1.0 and grid[-1] == 1e-3 and (np.diff(grid) < 0).all()


def test_time_uniform_network_times():
    model = Recorder(_torch_of(eps_np))
    dpm_solver_sample_loop(LINEAR, model, SHAPE, noise=X_T.clone(), steps=9)
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in model.times)
    assert [float(t[0]) for t in model.times] == [999.0 - 111.0 * k for k in range(9)]
    # Another N: the index scale is that of the N-step model (N t - 1), first call at N - 1 (given:
    # this 100-step linear schedule reaches lambda -5.40, so by default it would start at -5.1).
    short = create_diffusion(steps=100, learn_sigma=False)
    model = Recorder(_torch_of(eps_np))
    dpm_solver_sample_loop(short, model, SHAPE, noise=X_T.clone(), steps=11, start_timestep=99)
    assert [float(t[0]) for t in model.times] == [99.0 - 9.0 * k for k in range(11)]


def test_order_1_is_ddim_on_the_same_grid():
    kept = [111 * k for k in range(10)]  # the indices of the 9-step time_uniform grid
    betas = get_named_beta_schedule("linear", 1000)
    ddim = GaussianDiffusion(betas, use_timesteps=kept, model_var_type="fixed_large")
    for guided in (False, True):
        model, cond_fn = _torch_of(eps_np, False), (_torch_of(grad_np, False) if guided else None)
        outs = list(ddim.ddim_sample_loop_progressive(model, SHAPE, noise=X_T.clone(), clip_denoised=False,
                                                      cond_fn=cond_fn))
        model, cond_fn = _torch_of(eps_np), (_torch_of(grad_np) if guided else None)
        got = dpm_solver_sample_loop(LINEAR, model, SHAPE, noise=X_T.clone(), cond_fn=cond_fn, steps=9, order=1)
        # DDIM's last step (index 0 -> x0) has no counterpart: the solver stops at index 0.
        torch.testing.assert_close(got, outs[-2]["sample"], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- model outputs and guidance


def test_learned_sigma_output_uses_first_channels():
    eps = _torch_of(eps_np)
    doubled = lambda x, t: torch.cat([eps(x, t), 100.0 + x], dim=1)  # noqa: E731
    learned = create_diffusion()  # learn_sigma=True
    a = dpm_solver_sample_loop(learned, doubled, SHAPE, noise=X_T.clone(), steps=4)
    b = dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T.clone(), steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output has 5 channels"):
        dpm_solver_sample_loop(LINEAR, lambda x, t: torch.zeros(2, 5, 4, 4, dtype=x.dtype), SHAPE,
                               noise=X_T.clone(), steps=2)


def _sigma_at_index(diffusion, t_index):
    """sigma at a fractional original index: log alpha is linear in t, and so in the index."""
    la = 0.5 * np.log(diffusion.alphas_cumprod)
    return np.sqrt(1.0 - np.exp(2.0 * np.interp(t_index, np.arange(len(la)), la)))


def test_cond_fn_shifts_eps_by_sigma_times_gradient():
    eps, grad = _torch_of(eps_np), _torch_of(grad_np)

    def folded(x, t):
        return eps(x, t) - float(_sigma_at_index(LINEAR, float(t[0]))) * grad(x, t)

    # 4 and 9 time_uniform steps put every call at a float32-exact index (749.25, 888, ...), so sigma
    # from the network time is sigma at the grid time; other grids round the time to float32.
    for steps in (4, 9):
        a = dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T.clone(), cond_fn=grad, steps=steps)
        b = dpm_solver_sample_loop(LINEAR, folded, SHAPE, noise=X_T.clone(), steps=steps)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class Conditional(nn.Module):
    """eps depends on the label; 2C output (eps | v); records batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        scale = (y.to(x.dtype) + 1.0).view(-1, 1, 1, 1)
        eps = 0.3 * x + scale * W[:1].to(x.dtype) * (t.to(x.dtype).view(-1, 1, 1, 1) / 1000.0)
        return torch.cat([eps, -eps], dim=1)


def test_classifier_free_guidance_through_the_wrapped_model():
    inner = Conditional()
    y = torch.tensor([1, 4])
    cfg = ClassifierFreeGuidance(inner, 3.0, null_label=9)

    def combined(x, t, y):
        cond, uncond = inner(x, t, y)[:, :3], inner(x, t, torch.full_like(y, 9))[:, :3]
        return uncond + 3.0 * (cond - uncond)

    a = dpm_solver_sample_loop(create_diffusion(), cfg, SHAPE, noise=X_T.clone(), model_kwargs={"y": y}, steps=5)
    assert inner.batches == [4] * 5  # one doubled batch per evaluation
    b = dpm_solver_sample_loop(LINEAR, combined, SHAPE, noise=X_T.clone(), model_kwargs={"y": y}, steps=5)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))

    def forward(self, x, t):
        return self.net(x.to(self.net[1].weight.dtype)) + 1e-3 * t.to(x.dtype).view(-1, 1)


def test_guidance_interval_in_the_solver():
    clf, y = LinearClassifier().double(), torch.tensor([0, 3])
    unit = classifier_cond_fn(clf, 1.0)

    def run(cond_fn):
        return dpm_solver_sample_loop(LINEAR, _torch_of(eps_np), SHAPE, noise=X_T.clone(), cond_fn=cond_fn,
                                      model_kwargs={"y": y}, steps=4)

    everywhere, unguided = run(classifier_cond_fn(clf, 2.0)), run(None)
    torch.testing.assert_close(run(classifier_cond_fn(clf, "2@0:999")), everywhere, rtol=0, atol=0)
    torch.testing.assert_close(run(classifier_cond_fn(clf, "2@1000:2000")), unguided, rtol=0, atol=0)
    # Times are 999, 749.25, 499.5, 249.75: "2@749.25:999" guides the first two (inclusive ends).
    by_hand = lambda x, t, y: unit(x, t, y=y) * (2.0 * (t >= 749.25)).to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    partial = run(classifier_cond_fn(clf, "2@749.25:999"))
    torch.testing.assert_close(partial, run(by_hand), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(partial, everywhere) and not torch.allclose(partial, unguided)


# ---------------------------------------------------------------------------- refusals


def test_argument_errors():
    eps = _torch_of(eps_np)
    with pytest.raises(ValueError, match="order must be 1 or 2.*third order"):
        dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T, order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T, order=0)
    with pytest.raises(ValueError, match="without timestep_respacing"):
        dpm_solver_sample_loop(create_diffusion(timestep_respacing="ddim25"), eps, SHAPE, noise=X_T)
    for steps in (0, 2.5, True, "20"):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T, steps=steps)
    with pytest.raises(ValueError, match="unknown skip_type 'logsnr'"):
        dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T, skip_type="logsnr")
    with pytest.raises(ValueError, match="noise .* has shape"):
        dpm_solver_sample_loop(LINEAR, eps, (3, 3, 4, 4), noise=X_T)
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        dpm_solver_sample_loop(LINEAR, eps, SHAPE, noise=X_T, model_kwargs=[1])


# ---------------------------------------------------------------------------- host synchronisation


class CountLocalScalarDense(TorchDispatchMode):
    """Counts aten._local_scalar_dense: every .item(), int(t), bool(t) of a tensor goes through it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_per_step():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 6, 3, padding=1)
    model = lambda x, t: net(x) + 1e-3 * t.view(-1, 1, 1, 1)  # noqa: E731
    cond_fn = lambda x, t: 0.1 * x * t.view(-1, 1, 1, 1) / 1000  # noqa: E731
    counts = []
    for steps in (5, 10):
        with CountLocalScalarDense() as counter:
            dpm_solver_sample_loop(create_diffusion(), model, (2, 3, 8, 8), noise=torch.randn(2, 3, 8, 8),
                                   cond_fn=cond_fn, steps=steps, thresholding=True)
        counts.append(counter.count)
    assert counts[0] == counts[1], counts


# ---------------------------------------------------------------------------- the tiny networks


def _perturbed(name):
    """The preset's network with its zero-initialised layers filled in: at ADM's init the residual
    branches output 0, so neither the time nor the input would reach the output."""
    net = presets.build(name).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return net


def test_tiny_unet_with_tiny_classifier_float32():
    torch.manual_seed(0)
    unet, clf = _perturbed("tiny-unet"), _perturbed("tiny-classifier")
    diffusion = presets.get("tiny-unet").diffusion.build()
    seen = []

    def classifier(x, t):
        seen.append(t.clone())
        return clf(x, t)

    y = torch.tensor([3, 7])
    noise = torch.randn(2, 3, 16, 16)
    guided = dpm_solver_sample_loop(diffusion, unet, (2, 3, 16, 16), noise=noise, cond_fn=classifier_cond_fn(classifier, 1.0),
                                    model_kwargs={"y": y}, steps=4, thresholding=True)
    plain = dpm_solver_sample_loop(diffusion, unet, (2, 3, 16, 16), noise=noise, model_kwargs={"y": y}, steps=4,
                                   thresholding=True)
    assert guided.dtype == torch.float32 and guided.shape == (2, 3, 16, 16) and torch.isfinite(guided).all()
    assert [float(t[0]) for t in seen] == [999.0, 749.25, 499.5, 249.75] and seen[0].dtype == torch.float32
    assert not torch.equal(guided, plain)


def test_classifier_cond_fn_takes_float_timesteps():
    torch.manual_seed(0)
    clf = _perturbed("tiny-classifier")
    cond_fn = classifier_cond_fn(clf, 1.0)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    as_float = cond_fn(x, torch.tensor([500.0, 3.0]), y=y)
    torch.testing.assert_close(as_float, cond_fn(x, torch.tensor([500, 3]), y=y), rtol=0, atol=0)
    fractional = cond_fn(x, torch.tensor([500.5, 3.25]), y=y)
    assert fractional.dtype == torch.float32 and torch.isfinite(fractional).all()
    assert not torch.equal(fractional, as_float)


def test_the_diffusion_object_offers_the_solver():
    from diffusion_core.diffusion import create_diffusion

    d = create_diffusion(learn_sigma=False)
    model = lambda x, t: 0.1 * x  # noqa: E731
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = dpm_solver_sample_loop(d, model, x_t.shape, noise=x_t, steps=6)
    torch.testing.assert_close(d.dpm_solver_sample_loop(model, x_t.shape, noise=x_t, steps=6), direct, rtol=0, atol=0)
