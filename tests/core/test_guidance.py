"""Classifier and classifier-free guidance, checked against ADM_SPEC §5 and a closed-form mixture."""

import math

import pytest
import torch
import torch.nn as nn

from diffusion_core.diffusion import create_diffusion
from diffusion_core.guidance import (
    ClassifierFreeGuidance,
    GuidanceInterval,
    GuidanceSchedule,
    classifier_cond_fn,
    guided_sampling,
    parse_guidance_scale,
)

# ---------------------------------------------------------------------------- the mixture
# Data: 2-D points (stored as [B, 2, 1, 1]) from 0.5 N(+mu, s^2 I) + 0.5 N(-mu, s^2 I).
# Noised at original timestep t: component k gives x_t ~ N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I),
# so p(k | x_t) and the score are analytic.
MU = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
S = 0.1
BASE = create_diffusion(steps=1000, learn_sigma=False)
ABAR = torch.tensor(BASE.alphas_cumprod)


def _moments(x, t):
    a = ABAR[t].to(x.dtype).view(-1, 1)
    means = a.sqrt().unsqueeze(1) * MU.to(x.dtype)  # [B, 2 components, 2 dims]
    var = a * S**2 + 1 - a  # [B, 1]
    return a, means, var


def mixture_logits(x, t):
    """log p(k | x_t) up to a constant: -|x - m_k|^2 / (2 v)."""
    flat = x.flatten(1)
    _, means, var = _moments(flat, t)
    return -((flat.unsqueeze(1) - means) ** 2).sum(-1) / (2 * var)


class MixtureClassifier(nn.Module):
    """The exact noisy classifier of the mixture, as a module returning logits."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t):
        self.calls.append(x.shape[0])
        return mixture_logits(x, t)


def mixture_eps(x, t, y=None, null_label=2):
    """Exact eps predictor: of the mixture, or of component y (y == null_label: the mixture)."""
    flat = x.flatten(1)
    a, means, var = _moments(flat, t)
    diffs = (flat.unsqueeze(1) - means) / var.unsqueeze(1)  # -(score) of each component
    if y is None:
        weights = torch.softmax(mixture_logits(x, t), dim=-1)
    else:
        weights = torch.softmax(mixture_logits(x, t), dim=-1)
        onehot = torch.nn.functional.one_hot(y.clamp(max=1), 2).to(x.dtype)
        conditional = (y != null_label).to(x.dtype).unsqueeze(1)
        weights = conditional * onehot + (1 - conditional) * weights
    eps = (1 - a).sqrt() * (weights.unsqueeze(-1) * diffs).sum(1)
    return eps.view_as(x)


def fraction_in_requested_component(samples, y):
    side = torch.where(samples.flatten(1)[:, 0] > 0, 0, 1)
    return (side == y).double().mean().item()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def labels():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (600,), generator=g)


def _sample(kind, model, cond_fn, y, seed=0):
    diffusion = create_diffusion(steps=1000, learn_sigma=False, sigma_small=True, timestep_respacing="100")
    torch.manual_seed(seed)
    shape = (y.shape[0], 2, 1, 1)
    noise = torch.randn(shape, dtype=torch.float64)
    loop = diffusion.p_sample_loop if kind == "ddpm" else diffusion.ddim_sample_loop
    return loop(model, shape, noise=noise, cond_fn=cond_fn, model_kwargs={"y": y})


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_mixture_classifier_guidance(kind, labels):
    unconditional = lambda x, t, y=None: mixture_eps(x, t)  # noqa: E731
    free = _sample(kind, unconditional, None, labels)
    zero = _sample(kind, unconditional, classifier_cond_fn(MixtureClassifier(), 0.0), labels)
    guided = _sample(kind, unconditional, classifier_cond_fn(MixtureClassifier(), 1.0), labels)
    # Scale 0: the label is ignored, about half the samples land in each component.
    assert 0.4 < fraction_in_requested_component(free, labels) < 0.6
    torch.testing.assert_close(zero, free)
    # Scale 1 samples p(x | y): (nearly) all in the requested component, near its mean.
    assert fraction_in_requested_component(guided, labels) >= 0.9
    # ... with the component's spread: per-coordinate std close to S (not collapsed onto the mean).
    offsets = guided.flatten(1) - MU[labels]
    inside = offsets.norm(dim=1) < 5 * S
    assert inside.double().mean().item() >= 0.9
    assert 0.7 * S < offsets[inside].std(dim=0).mean().item() < 1.3 * S


def test_mixture_classifier_free_guidance_and_combination(labels):
    model = lambda x, t, y=None: mixture_eps(x, t, y)  # noqa: E731
    unconditional = ClassifierFreeGuidance(model, 0.0, null_label=2)
    cfg = ClassifierFreeGuidance(model, 1.0, null_label=2)
    assert 0.4 < fraction_in_requested_component(_sample("ddpm", unconditional, None, labels), labels) < 0.6
    assert fraction_in_requested_component(_sample("ddpm", cfg, None, labels), labels) >= 0.9
    both_model, cond_fn = guided_sampling(
        model, MixtureClassifier(), classifier_scale=1.0, cfg_scale=1.0, null_label=2
    )
    assert isinstance(both_model, ClassifierFreeGuidance) and cond_fn is not None
    assert fraction_in_requested_component(_sample("ddim", both_model, cond_fn, labels), labels) >= 0.9


# ---------------------------------------------------------------------------- guided steps (§5)


def hand_cond_fn(x, t, y=None):
    """A deterministic stand-in gradient that depends on x, the ORIGINAL t and y."""
    return 0.3 * x + 1e-3 * t.to(x.dtype).view(-1, 1, 1, 1) - 0.2 * y.to(x.dtype).view(-1, 1, 1, 1)


def test_guided_ddpm_step_matches_algorithm_1():
    d = create_diffusion(steps=1000, learn_sigma=False, timestep_respacing="ddim50")
    e = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64) * 1.5
    z = torch.randn_like(x)
    y = torch.tensor([0, 1, 2])
    t = torch.tensor([0, 10, 49])
    out = d.p_sample(lambda x, t, y=None: e, x, t, cond_fn=hand_cond_fn, model_kwargs={"y": y}, noise=z)
    for i, ti in enumerate(t.tolist()):
        beta, ab, abp = d.betas[ti], d.alphas_cumprod[ti], d.alphas_cumprod_prev[ti]
        x0 = (x[i] / math.sqrt(ab) - math.sqrt(1 / ab - 1) * e[i]).clamp(-1, 1)
        mean = beta * math.sqrt(abp) / (1 - ab) * x0 + (1 - abp) * math.sqrt(1 - beta) / (1 - ab) * x[i]
        # Fixed large variance: beta_t, except t = 0 which uses the posterior variance of t = 1.
        var = d.posterior_variance[1] if ti == 0 else beta
        g = 0.3 * x[i] + 1e-3 * (ti * 20) - 0.2 * float(y[i])
        expected = mean + var * g + (ti != 0) * math.sqrt(var) * z[i]
        torch.testing.assert_close(out["sample"][i], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["pred_xstart"][i], x0)  # the unguided x0 is returned


def test_guided_ddim_step_matches_algorithm_2():
    d = create_diffusion(steps=1000, learn_sigma=False, timestep_respacing="ddim25")
    e = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64) * 1.5
    y = torch.tensor([2, 0, 1])
    t = torch.tensor([0, 12, 24])
    out = d.ddim_sample(lambda x, t, y=None: e, x, t, cond_fn=hand_cond_fn, model_kwargs={"y": y})
    for i, ti in enumerate(t.tolist()):
        ab, abp = d.alphas_cumprod[ti], d.alphas_cumprod_prev[ti]
        x0 = (x[i] / math.sqrt(ab) - math.sqrt(1 / ab - 1) * e[i]).clamp(-1, 1)
        eps = (x[i] / math.sqrt(ab) - x0) / math.sqrt(1 / ab - 1)
        g = 0.3 * x[i] + 1e-3 * (ti * 40) - 0.2 * float(y[i])
        eps_g = eps - math.sqrt(1 - ab) * g
        x0_g = x[i] / math.sqrt(ab) - math.sqrt(1 / ab - 1) * eps_g  # not re-clipped
        expected = math.sqrt(abp) * x0_g + math.sqrt(1 - abp) * eps_g
        torch.testing.assert_close(out["sample"][i], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["pred_xstart"][i], x0_g)


def test_condition_mean_and_score_follow_dtype():
    d = create_diffusion(steps=100, learn_sigma=False)
    x = torch.randn(2, 2, 2, 2)
    t = torch.tensor([3, 60])
    pmv = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    cond = lambda x, t: torch.ones_like(x, dtype=torch.float64)  # noqa: E731
    assert d.condition_mean(cond, pmv, x, t).dtype == torch.float32
    assert d.condition_score(cond, pmv, x, t)["pred_xstart"].dtype == torch.float32


# ---------------------------------------------------------------------------- classifier_cond_fn


def test_cond_fn_gradient_matches_closed_form():
    torch.manual_seed(3)
    x = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([0, 100, 400, 800, 999])
    y = torch.tensor([0, 1, 1, 0, 1])
    clf = MixtureClassifier()
    with torch.no_grad():  # samplers call cond_fn without grad; it must enable it itself
        grad = classifier_cond_fn(clf, 2.5)(x, t, y=y)
    assert clf.calls == [5]  # one forward (and backward) for the whole batch
    assert grad.dtype == torch.float64 and not grad.requires_grad
    flat = x.flatten(1)
    _, means, var = _moments(flat, t)
    probs = torch.softmax(mixture_logits(x, t), dim=-1)
    # d/dx log p(y|x) = -(x - m_y)/v + sum_k p_k (x - m_k)/v
    expected = -(flat - means[torch.arange(5), y]) / var + (probs.unsqueeze(-1) * (flat.unsqueeze(1) - means)).sum(1) / var
    torch.testing.assert_close(grad.flatten(1), 2.5 * expected)


class SmallClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 3))

    def forward(self, x, t):
        return self.net(x) + 1e-3 * t.to(x.dtype).view(-1, 1)


def test_cond_fn_float32_under_autocast():
    clf = SmallClassifier()
    x = torch.randn(4, 2, 2, 2)
    t = torch.tensor([1, 2, 3, 4])
    y = torch.tensor([0, 1, 2, 0])
    ref = classifier_cond_fn(clf, 1.0)(x, t, y=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert clf.net(x).dtype == torch.bfloat16
        low = classifier_cond_fn(clf, 1.0)(x, t, y=y)
    assert ref.dtype == torch.float32 and low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.1, atol=0.02)


def test_cond_fn_scale_schedule():
    clf = SmallClassifier()
    x = torch.randn(3, 2, 2, 2)
    t = torch.tensor([999, 0, 999])
    y = torch.tensor([0, 1, 2])
    unit = classifier_cond_fn(clf, 1.0)(x, t, y=y)
    for scale in (GuidanceSchedule("linear", start=4.0, end=0.5), "linear:4:0.5"):
        got = classifier_cond_fn(clf, scale)(x, t, y=y)
        torch.testing.assert_close(got, unit * torch.tensor([4.0, 0.5, 4.0]).view(3, 1, 1, 1))


def test_cond_fn_bad_labels():
    cond_fn = classifier_cond_fn(SmallClassifier(), 1.0)
    x = torch.randn(2, 2, 2, 2)
    t = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="needs class labels"):
        cond_fn(x, t)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cond_fn(x, t, y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 labels for a batch of"):
        classifier_cond_fn(SmallClassifier(), 1.0)(torch.randn(3, 2, 2, 2), torch.tensor([1, 2, 3]), y=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- schedules


def test_guidance_schedules():
    t = torch.tensor([999, 0, 333])
    torch.testing.assert_close(GuidanceSchedule("constant", 2.0)(t), torch.full((3,), 2.0, dtype=torch.float64))
    lin = GuidanceSchedule("linear", start=3.0, end=1.0)(t)
    torch.testing.assert_close(lin, torch.tensor([3.0, 1.0, 1.0 + 2.0 * 333 / 999], dtype=torch.float64))
    # Cosine: w = (1 - cos(pi * t / 999)) / 2; at t = 333 (a third) w = (1 - 0.5) / 2 = 0.25.
    cos = GuidanceSchedule("cosine", start=3.0, end=1.0)(t)
    torch.testing.assert_close(cos, torch.tensor([3.0, 1.0, 1.5], dtype=torch.float64), rtol=1e-3, atol=1e-3)
    assert parse_guidance_scale("2.5") == 2.5 and parse_guidance_scale(1) == 1.0
    assert parse_guidance_scale("cosine:1:2") == GuidanceSchedule("cosine", 1.0, 2.0)
    for bad in ("linear:1", "quadratic:1:2", "abc"):
        with pytest.raises(ValueError, match="cannot read guidance scale"):
            parse_guidance_scale(bad)
    with pytest.raises(ValueError, match="unknown guidance schedule kind"):
        GuidanceSchedule("step", 1.0)


# ---------------------------------------------------------------------------- classifier-free wrapper


class RecordingConditional(nn.Module):
    """out = x * (y + 1) + low_res, with a 2*C output (eps | v) when learn_sigma."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y=None, low_res=None):
        self.batches.append((x.shape[0], y.tolist()))
        eps = x * (y.to(x.dtype) + 1).view(-1, 1, 1, 1) + (0 if low_res is None else low_res)
        return torch.cat([eps, -eps], dim=1)


def test_classifier_free_guidance_formula():
    inner = RecordingConditional()
    x = torch.randn(2, 1, 2, 2)
    low = torch.randn(2, 1, 2, 2)
    t = torch.tensor([10, 20])
    y = torch.tensor([1, 3])
    cfg = ClassifierFreeGuidance(inner, 3.0, null_label=4)
    out = cfg(x, t, y=y, low_res=low)
    assert inner.batches == [(4, [1, 3, 4, 4])]  # one doubled batch
    cond = x * torch.tensor([2.0, 4.0]).view(2, 1, 1, 1) + low
    uncond = x * 5.0 + low
    eps = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(out, torch.cat([eps, -eps], dim=1))  # all channels by default
    keep = ClassifierFreeGuidance(inner, 3.0, null_label=4, guide_variance=False)(x, t, y=y, low_res=low)
    torch.testing.assert_close(keep, torch.cat([eps, -cond], dim=1))
    one = ClassifierFreeGuidance(inner, 1.0, null_label=4)(x, t, y=y, low_res=low)
    torch.testing.assert_close(one, torch.cat([cond, -cond], dim=1))


def test_classifier_free_guidance_errors():
    inner = RecordingConditional()
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(inner, 1.0, null_label=-1)
    cfg = ClassifierFreeGuidance(inner, 1.0, null_label=4)
    with pytest.raises(ValueError, match="needs class labels"):
        cfg(torch.zeros(1, 1, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        cfg(torch.zeros(1, 1, 2, 2), torch.tensor([0]), y=torch.tensor([7]))
    with pytest.raises(ValueError, match="needs null_label"):
        guided_sampling(inner, cfg_scale=2.0)
    with pytest.raises(ValueError, match="without a classifier"):
        guided_sampling(inner, classifier_scale=2.0)
    model, cond_fn = guided_sampling(inner)
    assert model is inner and cond_fn is None


# ---------------------------------------------------------------------------- guidance intervals


def test_guidance_interval_values_and_endpoints():
    t = torch.tensor([0, 199, 200, 500, 800, 801, 999])
    interval = GuidanceInterval(4.0, 200, 800)
    assert interval(t).dtype == torch.float64
    assert interval(t).tolist() == [0, 0, 4, 4, 4, 0, 0]  # inclusive at both ends
    assert interval(torch.tensor([199.75, 200.0, 800.0, 800.25])).tolist() == [0, 4, 4, 0]  # float times
    assert GuidanceInterval(4.0, 200, 800, outside=1.0)(t).tolist() == [1, 1, 4, 4, 4, 1, 1]
    linear = GuidanceSchedule("linear", 3.0, 1.0)
    torch.testing.assert_close(GuidanceInterval(linear, 0, 500)(t), linear(t) * (t <= 500))
    with pytest.raises(ValueError, match="LO <= HI"):
        GuidanceInterval(4.0, 800, 200)
    with pytest.raises(ValueError, match="LO <= HI"):
        GuidanceInterval(4.0, -1, 200)
    with pytest.raises(ValueError, match="parse a string"):
        GuidanceInterval("4", 0, 200)


def test_guidance_interval_string_syntax():
    assert parse_guidance_scale("4@200:800") == GuidanceInterval(4.0, 200.0, 800.0)
    assert parse_guidance_scale(" linear:4:1@0:600.5 ") == GuidanceInterval(GuidanceSchedule("linear", 4.0, 1.0), 0.0, 600.5)
    assert parse_guidance_scale("cosine:4:1@0:60", num_timesteps=100).scale.num_timesteps == 100
    for bad in ("4@200", "4@a:800", "@200:800", "4@1:2@3:4", "4@200:800:5", "abc@1:2"):
        with pytest.raises(ValueError, match="cannot read guidance scale"):
            parse_guidance_scale(bad)
    with pytest.raises(ValueError, match="LO <= HI"):
        parse_guidance_scale("4@800:200")


def test_guidance_interval_for_classifier_and_classifier_free():
    clf = SmallClassifier()
    x, t, y = torch.randn(3, 2, 2, 2), torch.tensor([100, 200, 999]), torch.tensor([0, 1, 2])
    unit = classifier_cond_fn(clf, 1.0)(x, t, y=y)
    got = classifier_cond_fn(clf, "4@200:800")(x, t, y=y)  # outside: no gradient (scale 0)
    torch.testing.assert_close(got, unit * torch.tensor([0.0, 4.0, 0.0]).view(3, 1, 1, 1))
    inner = RecordingConditional()
    xs, ys = torch.randn(3, 1, 2, 2), torch.tensor([1, 3, 0])
    out = ClassifierFreeGuidance(inner, "3@200:800", null_label=4)(xs, t, y=ys)
    cond = xs * (ys.double() + 1).float().view(3, 1, 1, 1)
    uncond = xs * 5.0
    # Outside: w = 1, the conditional model (not w = 0, the unconditional one).
    eps = torch.stack([cond[0], uncond[1] + 3.0 * (cond[1] - uncond[1]), cond[2]])
    torch.testing.assert_close(out, torch.cat([eps, -eps], dim=1))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_guidance_interval_in_the_loops(kind, labels):
    y = labels[:16]
    unconditional = lambda x, t, y=None: mixture_eps(x, t)  # noqa: E731
    clf = MixtureClassifier()
    # _sample respaces to 100 steps (about every 10th original timestep); the interval sees those.
    everywhere = _sample(kind, unconditional, classifier_cond_fn(clf, 2.0), y)
    torch.testing.assert_close(_sample(kind, unconditional, classifier_cond_fn(clf, "2@0:999"), y), everywhere)
    nowhere = _sample(kind, unconditional, classifier_cond_fn(clf, "2@1000:2000"), y)
    torch.testing.assert_close(nowhere, _sample(kind, unconditional, None, y))
    partial = _sample(kind, unconditional, classifier_cond_fn(clf, "2@300:700"), y)
    by_hand = classifier_cond_fn(clf, lambda t: 2.0 * ((t >= 300) & (t <= 700)).double())
    torch.testing.assert_close(partial, _sample(kind, unconditional, by_hand, y))
    assert not torch.allclose(partial, everywhere) and not torch.allclose(partial, nowhere)
    # Classifier-free: outside the interval the loops see the plain conditional model.
    model = lambda x, t, y=None: mixture_eps(x, t, y)  # noqa: E731
    conditional = _sample(kind, lambda x, t, y=None: model(x, t, y), None, y)
    outside = _sample(kind, ClassifierFreeGuidance(model, "3@1000:2000", null_label=2), None, y)
    torch.testing.assert_close(outside, conditional)
