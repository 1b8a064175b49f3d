"""Guidance for sampling: classifier gradients, classifier-free guidance, and scale schedules.

Timesteps seen here are always ORIGINAL timesteps (0..T-1 of the training chain): the diffusion
object maps respaced indices before it calls a model or a cond_fn. They are int64 from the DDPM
and DDIM loops and float32 (possibly fractional) from the DPM-Solver; everything here takes both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class GuidanceSchedule:
    """A guidance scale that varies with the original timestep t.

    `start` is the scale at the noisiest step (t = num_timesteps - 1, where sampling begins),
    `end` the scale at t = 0. Kinds: "constant" (always `start`), "linear" (linear in t),
    "cosine" (a half cosine in t: flat near both ends). Calling it with an int64 tensor of
    timesteps returns a float64 tensor of per-sample scales on the same device.
    """

    kind: str = "constant"
    start: float = 1.0
    end: Optional[float] = None
    num_timesteps: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown guidance schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        _finite(self.start, "guidance schedule start")
        if self.end is not None:
            _finite(self.end, "guidance schedule end")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        start = float(self.start)
        end = start if self.end is None else float(self.end)
        t = torch.as_tensor(t)
        if self.kind == "constant" or self.num_timesteps == 1:
            return torch.full(t.shape, start, dtype=torch.float64, device=t.device)
        # w = 1 at the noisiest step, 0 at t = 0.
        w = t.to(torch.float64) / (self.num_timesteps - 1)
        if self.kind == "cosine":
            w = (1.0 - torch.cos(math.pi * w)) / 2.0
        return end + (start - end) * w


@dataclass(frozen=True)
class GuidanceInterval:
    """Guidance limited to an interval of timesteps (Kynkaenniemi et al. 2024).

    The scale is `scale` (a number, a GuidanceSchedule or a callable of t) for original
    timesteps lo <= t <= hi (inclusive; t may be fractional, e.g. the DPM-Solver's float32
    times) and `outside` elsewhere. `outside=None` means "no guidance" there, which depends on
    the kind: classifier_cond_fn reads it as 0 (no gradient), ClassifierFreeGuidance as 1 (the
    plain conditional model, as in the paper; 0 would be the unconditional model). String form:
    "SCALE@LO:HI", e.g. "4@200:800" or "linear:4:1@0:600" (see parse_guidance_scale). Outside
    the interval the networks still run (their share is multiplied away), so the loops never
    wait for the host to decide. Returns a float64 tensor of per-sample scales like t.
    """

    scale: Union[float, "GuidanceSchedule", Callable[[torch.Tensor], torch.Tensor]] = 1.0
    lo: float = 0.0
    hi: float = 999.0
    outside: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.scale, (str, bool)) or not (
            isinstance(self.scale, (int, float)) or callable(self.scale)
        ):
            raise ValueError(
                f"GuidanceInterval.scale must be a number, a GuidanceSchedule or a callable of t, got "
                f"{self.scale!r}; parse a string with parse_guidance_scale('S@LO:HI')"
            )
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"guidance interval bound {name} must be a finite number, got {value!r}")
        if not 0 <= self.lo <= self.hi:
            raise ValueError(
                f"guidance interval [{self.lo}, {self.hi}] needs 0 <= LO <= HI (original timesteps, inclusive)"
            )
        if self.outside is not None and (isinstance(self.outside, bool) or not isinstance(self.outside, (int, float))):
            raise ValueError(f"GuidanceInterval.outside must be a number or None, got {self.outside!r}")
        for value in (self.scale, self.outside):
            if isinstance(value, (int, float)):
                _finite(value, "guidance scale")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if isinstance(self.scale, (int, float)):
            inside = torch.full(t.shape, float(self.scale), dtype=torch.float64, device=t.device)
        else:
            inside = torch.as_tensor(self.scale(t), device=t.device).to(torch.float64).expand(t.shape)
        t64 = t.to(torch.float64)
        outside = 0.0 if self.outside is None else float(self.outside)
        return torch.where((t64 >= self.lo) & (t64 <= self.hi), inside, torch.full_like(inside, outside))

    def with_outside(self, value: float) -> "GuidanceInterval":
        """This interval with `outside` set to `value` if it was None ("no guidance")."""
        return self if self.outside is not None else replace(self, outside=float(value))


ScaleLike = Union[float, int, str, Callable[[torch.Tensor], torch.Tensor]]


def _finite(value, what: str) -> float:
    # A NaN scale turns every sample into NaN, written as black pixels: refuse it where it is given.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)

_SCALE_SYNTAX = (
    "use a number ('2.5'), 'constant:S', 'linear:START:END' or 'cosine:START:END' (START at the noisiest "
    "step, END at t=0), optionally limited to original timesteps LO..HI (inclusive) with '@LO:HI', "
    "e.g. '4@200:800'"
)


def parse_guidance_scale(value: ScaleLike, num_timesteps: int = 1000):
    """Turn a user's scale into a float or a schedule.

    Accepts a number, a callable of t, or a string: "2.5" (constant), "linear:START:END" or
    "cosine:START:END" (START at the noisiest step, END at t = 0), "constant:S", and any of
    these followed by "@LO:HI" for a guidance interval: the scale applies only at original
    timesteps LO <= t <= HI and guidance is off elsewhere (GuidanceInterval), e.g. "4@200:800",
    "linear:4:1@0:600".
    """
    if callable(value) and not isinstance(value, (int, float, str)):
        return value
    if isinstance(value, bool):
        raise ValueError(f"guidance scale must be a number or a schedule string, got {value!r}")
    if isinstance(value, (int, float)):
        return _finite(value, "guidance scale")
    if isinstance(value, str):
        text = value.strip()
        if "@" in text:
            return _parse_interval(value, text, num_timesteps)
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return _finite(number, "guidance scale")
        parts = text.split(":")
        if parts[0] in SCHEDULE_KINDS:
            try:
                numbers = [float(p) for p in parts[1:]]
            except ValueError:
                numbers = None
            if parts[0] == "constant" and numbers is not None and len(numbers) == 1:
                return GuidanceSchedule("constant", numbers[0], None, num_timesteps)
            if parts[0] != "constant" and numbers is not None and len(numbers) == 2:
                return GuidanceSchedule(parts[0], numbers[0], numbers[1], num_timesteps)
        raise ValueError(f"cannot read guidance scale {value!r}; {_SCALE_SYNTAX}")
    raise ValueError(f"guidance scale must be a number, a string or a callable, got {type(value).__name__}")


def _parse_interval(value: str, text: str, num_timesteps: int) -> GuidanceInterval:
    scale_text, _, bounds_text = text.partition("@")
    bounds = bounds_text.split(":")
    try:
        lo, hi = float(bounds[0]), float(bounds[-1])
    except ValueError:
        lo = hi = None
    if len(bounds) != 2 or lo is None or not scale_text.strip():
        raise ValueError(f"cannot read guidance scale {value!r}; {_SCALE_SYNTAX}")
    return GuidanceInterval(parse_guidance_scale(scale_text, num_timesteps), lo, hi)


def _per_sample_scale(scale, t: torch.Tensor, dtype: torch.dtype, ndim: int):
    """A float stays a float; a schedule gives a [B, 1, 1, ...] tensor in `dtype`."""
    if isinstance(scale, float):
        return scale
    values = torch.as_tensor(scale(t), device=t.device).to(dtype)
    if values.ndim == 0:
        return values
    return values.view(-1, *([1] * (ndim - 1)))


def _check_labels(y, batch: int, num_classes: int, who: str) -> torch.Tensor:
    if y is None:
        raise ValueError(
            f"{who} needs class labels: pass model_kwargs={{'y': labels}} (int64, one per sample)"
        )
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be integers, got dtype {y.dtype}")
    y = y.reshape(-1)
    if y.shape[0] != batch:
        raise ValueError(f"{who}: got {y.shape[0]} labels for a batch of {batch}")
    if y.numel():
        # An asynchronous device assert, not int(y.min()): this runs at every step, and reading a
        # value back would make the host wait for the device each time. On a CPU it fails at once;
        # on a GPU as a device-side assert (the sampling job validates its labels before the loop).
        try:
            torch._assert_async(((y >= 0) & (y < num_classes)).all(), f"{who}: a label is outside [0, {num_classes})")
        except RuntimeError:
            raise ValueError(
                f"{who}: labels must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
            ) from None
    return y.long()


def classifier_cond_fn(classifier: nn.Module, scale: ScaleLike):
    """Classifier guidance: return `cond_fn(x, t, y=None, **kw)` for the diffusion samplers.

    cond_fn returns scale(t) * d/dx sum_i log_softmax(classifier(x, t))[i, y_i]: one forward
    and one backward for the whole batch, at the given noisy x, with `t` the original
    timesteps (int64, or float32 and fractional from the DPM-Solver; the classifier's sinusoidal
    embedding takes both). The gradient is float32 (float64 if x is float64) even when the
    classifier runs under autocast; it works when the caller is inside torch.no_grad. `scale` is
    a number, a schedule string (see parse_guidance_scale) or a callable of t; outside a
    guidance interval ("S@LO:HI") the scale is 0. Raises ValueError if y is missing or a label
    is outside the classifier's classes.
    """
    parsed = parse_guidance_scale(scale)
    if isinstance(parsed, GuidanceInterval):
        parsed = parsed.with_outside(0.0)

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y=None, **kwargs) -> torch.Tensor:
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if y is None:
            raise ValueError(
                "classifier guidance needs class labels: pass model_kwargs={'y': labels} to the sampler"
            )
        if isinstance(parsed, float) and parsed == 0.0:
            # Scale 0 contributes nothing; skip the classifier's forward and backward.
            return torch.zeros_like(x, dtype=out_dtype)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            labels = _check_labels(y, x.shape[0], logits.shape[-1], "classifier guidance")
            log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=log_probs.device), labels.to(log_probs.device)]
            (gradient,) = torch.autograd.grad(selected.sum(), x_in)
        gradient = gradient.to(out_dtype)
        return gradient * _per_sample_scale(parsed, t, out_dtype, x.ndim)

    return cond_fn


class ClassifierFreeGuidance(nn.Module):
    """Wrap a class-conditional model trained with a null label for classifier-free guidance.

    `forward(x, t, y, **kw)` runs the conditional (labels y) and unconditional (label
    `null_label`) passes as one doubled batch and returns eps_u + w (eps_c - eps_u), where
    w = scale(t): w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1
    guides. By default the combination covers all output channels (eps and the learned-variance
    channels); `guide_variance=False` keeps the conditional model's variance channels (the second
    half of the channels when the model outputs 2*C). Other tensor kwargs whose first dimension
    is the batch (e.g. `low_res`) are duplicated for both halves. Outside a guidance interval
    ("W@LO:HI", GuidanceInterval with outside=None) w = 1: the conditional model, unguided.
    """

    def __init__(self, model: nn.Module, scale: ScaleLike, null_label: int, guide_variance: bool = True):
        super().__init__()
        if not isinstance(null_label, int) or isinstance(null_label, bool) or null_label < 0:
            raise ValueError(
                f"null_label must be a non-negative int (the model's 'no label' index, usually "
                f"num_classes), got {null_label!r}"
            )
        self.model = model
        self.scale = parse_guidance_scale(scale)
        if isinstance(self.scale, GuidanceInterval):
            # "No guidance" for CFG is w = 1 (conditional); w = 0 would be the unconditional model.
            self.scale = self.scale.with_outside(1.0)
        self.null_label = null_label
        self.guide_variance = guide_variance

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, **kwargs) -> torch.Tensor:
        batch = x.shape[0]
        labels = _check_labels(y, batch, self.null_label + 1, "classifier-free guidance")
        labels = labels.to(x.device)
        doubled = {
            key: torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.ndim > 0
            and value.shape[0] == batch else value
            for key, value in kwargs.items()
        }
        out = self.model(
            torch.cat([x, x]), torch.cat([t, t]),
            y=torch.cat([labels, torch.full_like(labels, self.null_label)]), **doubled,
        )
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        cond, uncond = out[:batch], out[batch:]
        w = _per_sample_scale(self.scale, t, out.dtype, out.ndim)
        guided = uncond + w * (cond - uncond)
        if not self.guide_variance and out.shape[1] == 2 * x.shape[1]:
            channels = x.shape[1]
            guided = torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)
        return guided


def guided_sampling(
    model: nn.Module,
    classifier: Optional[nn.Module] = None,
    classifier_scale: ScaleLike = 0.0,
    cfg_scale: Optional[ScaleLike] = None,
    null_label: Optional[int] = None,
):
    """Combine the guidance options into `(model, cond_fn)` for the DDPM, DDIM and DPM-Solver loops.

    - classifier guidance only: `guided_sampling(model, classifier, classifier_scale=s)`;
    - classifier-free only: `guided_sampling(model, cfg_scale=w, null_label=num_classes)`;
    - both: give all of them; the CFG-wrapped model predicts eps and the classifier gradient
      shifts it as usual. cond_fn is None when no classifier (or a constant scale 0) is given.
    Labels travel in `model_kwargs={"y": labels}` for both.
    """
    if cfg_scale is not None:
        if null_label is None:
            raise ValueError("classifier-free guidance needs null_label (the model's 'no label' class index)")
        model = ClassifierFreeGuidance(model, cfg_scale, null_label)
    cond_fn = None
    parsed = parse_guidance_scale(classifier_scale)
    if classifier is not None and not (isinstance(parsed, float) and parsed == 0.0):
        cond_fn = classifier_cond_fn(classifier, parsed)
    elif classifier is None and not (isinstance(parsed, float) and parsed == 0.0):
        raise ValueError("a classifier scale was given without a classifier; pass classifier=")
    return model, cond_fn
