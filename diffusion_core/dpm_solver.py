"""Multistep DPM-Solver++ (Lu et al. 2022) for ADM models, on the continuous-time view of the
discrete training schedule (the facts are restated from the project notes FAST_SAMPLERS.md).

Continuous time. The unspaced process has N steps; discrete index n = 0..N-1 sits at
t_n = (n + 1) / N, so t runs from 1/N to 1. log alpha(t_n) = 0.5 log abar_n, and log alpha(t) is
the piecewise-linear interpolation of that table in t (the first / last segment extended outside
[1/N, 1]). sigma(t) = sqrt(1 - alpha(t)^2), lambda(t) = log alpha(t) - log sigma(t) (half log-SNR),
and t(lambda) interpolates the same table through log alpha = -0.5 log(1 + exp(-2 lambda)).
All tables and per-step coefficients are float64, computed once before the loop; the state x
follows the dtype of x_T (float32 normally, float64 in tests).

Network time. The model and cond_fn receive `t_index = N * t - 1` as float32 [B]: the original
index scale the networks were trained on (t_n maps to n exactly; between grid points the value is
fractional, which ADM's sinusoidal embedding accepts). For N = 1000 this equals the reference
implementation's 1000 * (t - 1/N); for another N the reference's formula would leave the index
scale, ours does not. Grids start at `default_start` (or a given `start_timestep`) and end at
t = 1/N (index 0), and the result is the state at index 0 (sigma = sqrt(1 - abar_0), 0.01 for the
linear schedule), not clipped, as the reference returns it.

Cosine schedule (ADM's 64 px models). The reference drops the trailing table entries with
lambda < -5.1 (for the 1000-step cosine schedule: indices 996..999, whose lambda falls to -9.92)
and re-spreads time over the 996 it keeps, so its network times are 1000/996 times the true
index (up to 4 units off at the noisy end) and its sampling starts at index 995's noise level.
Here the whole table is kept, so time labels are the true indices, and by default the solver
starts where the reference starts, at lambda = -5.1 (index 995.08): starting at index 999, where
alpha = 4.9e-5, multiplies the network's eps error by sigma / alpha = 2e4 in the first x0
prediction, and on the demo's cosine model it ruined the samples (FID 153 against 58 for
DPM-Solver++(2M)-25, unguided). With classifier guidance the guided x0 also carries
(sigma^2 / alpha) s grad log p, so a less noisy start can help further (`start_timestep`, e.g.
960, where DDIM-25's respacing starts; docs/sampling.md has the measurements). The "logSNR" grid
is evenly spaced in lambda from the start. The linear schedule (lambda(999) = -5.06) starts at
index 999 in both.

Solver (data prediction, "DPM-Solver++(2M)"). With h = lambda(t) - lambda(s), phi = expm1(-h):
order 1 is x_t = (sigma_t / sigma_s) x_s - alpha_t phi D0 (DDIM with eta = 0); order 2 adds
-0.5 alpha_t phi (D0 - D1) / r with r = (lambda(s0) - lambda(s1)) / h. The first step is
order 1; with `lower_order_final` and fewer than 10 steps, step k (1-based) uses order
min(order, steps + 1 - k). Third order is not implemented (order=3 is a ValueError).
Exactly `steps` model calls (and cond_fn calls), none after the last update; the loop does no
host synchronisation of its own (no .item() or tensor-to-bool), so on a GPU it only queues work.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from diffusion_core.noise import loop_device

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
SUPPORTED_ORDERS = (1, 2)
# The reference implementation's lowest lambda: by default the solver starts no noisier than this.
LAMBDA_MIN = -5.1
# Below this many steps the final steps drop to lower order (FAST_SAMPLERS.md, "lower order final").
_LOWER_ORDER_FINAL_BELOW = 10
# Dynamic thresholding (Imagen): the per-sample quantile of |x0| and the floor of its scale.
THRESHOLD_QUANTILE = 0.995
THRESHOLD_MAX = 1.0


def _interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation over increasing xp, extended linearly past both ends."""
    y = np.interp(x, xp, fp)
    low, high = x < xp[0], x > xp[-1]
    if low.any():
        slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
        y[low] = fp[0] + slope * (x[low] - xp[0])
    if high.any():
        slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y[high] = fp[-1] + slope * (x[high] - xp[-1])
    return y


class ContinuousSchedule:
    """The continuous-time view of a discrete N-step schedule (float64 numpy throughout).

    Built from the cumulative alphas of the unspaced process: `ContinuousSchedule(alphas_cumprod)`
    or `ContinuousSchedule.from_diffusion(diffusion)`. Methods take a float or an array of
    continuous times t (index n at t = (n + 1) / N) and return float64 arrays: `log_alpha(t)`,
    `alpha(t)`, `sigma(t)`, `lam(t)` (half log-SNR), `t_of_lambda(lam)` (the inverse of lam) and
    `network_time(t)` = N t - 1, the original index scale the networks take.
    """

    def __init__(self, alphas_cumprod):
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or abar.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 steps, got shape {abar.shape}")
        if not ((abar > 0).all() and (abar < 1).all() and (np.diff(abar) < 0).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1) and strictly decrease (every beta > 0)")
        self.num_timesteps = int(abar.shape[0])
        self.t_table = np.arange(1, self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
        self.log_alpha_table = 0.5 * np.log(abar)

    @classmethod
    def from_diffusion(cls, diffusion) -> "ContinuousSchedule":
        """The schedule of an unspaced GaussianDiffusion; a respaced one is a ValueError."""
        _check_unspaced(diffusion)
        return cls(diffusion.alphas_cumprod)

    def log_alpha(self, t) -> np.ndarray:
        """log alpha(t): the table 0.5 log abar interpolated linearly in t."""
        return _interp(np.atleast_1d(np.asarray(t, dtype=np.float64)), self.t_table, self.log_alpha_table)

    def alpha(self, t) -> np.ndarray:
        """alpha(t) = sqrt(abar) at the grid points."""
        return np.exp(self.log_alpha(t))

    def sigma(self, t) -> np.ndarray:
        """sigma(t) = sqrt(1 - alpha(t)^2)."""
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t) -> np.ndarray:
        """lambda(t) = log alpha(t) - log sigma(t), the half log-SNR (decreasing in t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def t_of_lambda(self, lam) -> np.ndarray:
        """The inverse of `lam`: log alpha = -0.5 log(1 + e^(-2 lambda)), then t from the table."""
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.atleast_1d(np.asarray(lam, dtype=np.float64)))
        # log alpha decreases in t; np.interp needs increasing abscissae.
        return _interp(log_alpha, self.log_alpha_table[::-1], self.t_table[::-1])

    def network_time(self, t) -> np.ndarray:
        """The original (fractional) timestep index N t - 1 that the networks receive."""
        return self.num_timesteps * np.atleast_1d(np.asarray(t, dtype=np.float64)) - 1.0


def default_start(schedule: ContinuousSchedule) -> float:
    """The continuous time the solver starts from by default: the noisiest t with lambda(t) >= -5.1,
    the reference implementation's lower end of lambda. For ADM's linear schedule (lambda(1) = -5.06)
    that is t = 1 (index N-1); for the cosine schedule t = 0.99608 (index 995.08), instead of index
    999 where alpha = 4.9e-5: an x0 predicted there multiplies the network's eps error by
    sigma / alpha = 2e4, and on the demo's cosine model DPM-Solver++(2M) with 25 evaluations started
    at 999 gave FID 153 against 58 from here (docs/sampling.md)."""
    return float(min(1.0, schedule.t_of_lambda(LAMBDA_MIN)[0]))


def time_grid(schedule: ContinuousSchedule, steps: int, skip_type: str = "time_uniform",
              t_start: float = 1.0) -> np.ndarray:
    """The `steps + 1` continuous times from `t_start` (default t = 1) down to t = 1/N (float64, decreasing).

    "time_uniform": evenly spaced in t; "logSNR": evenly spaced in lambda, mapped back with
    t_of_lambda; "time_quadratic": evenly spaced in sqrt(t), squared. Both ends are exact.
    """
    _check_steps(steps)
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    t_end = 1.0 / schedule.num_timesteps
    if not t_end < t_start <= 1.0:
        raise ValueError(f"the solver's start t={t_start} must lie in ({t_end}, 1] (original timesteps 0 < T <= "
                         f"{schedule.num_timesteps - 1})")
    if skip_type == "time_uniform":
        grid = np.linspace(t_start, t_end, steps + 1)
    elif skip_type == "logSNR":
        lams = np.linspace(schedule.lam(t_start)[0], schedule.lam(t_end)[0], steps + 1)
        grid = schedule.t_of_lambda(lams)
    else:
        grid = np.linspace(math.sqrt(t_start), math.sqrt(t_end), steps + 1) ** 2
    # The round trip through lambda (or the square) moves the ends by an ulp; pin them so the
    # first network time is exactly N - 1 and the last state is exactly index 0.
    grid[0], grid[-1] = t_start, t_end
    return grid


def step_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order of each of the `steps` updates: warm-up min(order, k), and with
    `lower_order_final` and steps < 10 at most steps + 1 - k at step k (1-based)."""
    orders = []
    for k in range(1, steps + 1):
        step_order = min(order, k)
        if lower_order_final and steps < _LOWER_ORDER_FINAL_BELOW:
            step_order = min(step_order, steps + 1 - k)
        orders.append(step_order)
    return orders


def dynamic_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted x0, per sample.

    s = max(quantile(|x0|, 0.995), 1) over the sample's values (torch.quantile, linear
    interpolation); returns clamp(x0, -s, s) / s.
    """
    flat = x0.abs().reshape(x0.shape[0], -1)
    s = torch.quantile(flat, THRESHOLD_QUANTILE, dim=1).clamp(min=THRESHOLD_MAX)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


# --------------------------------------------------------------------------------------------
# Argument checks (once, at the entry)


def _check_unspaced(diffusion) -> None:
    n = int(diffusion.num_timesteps)
    kept = getattr(diffusion, "timestep_map", None)
    original = int(getattr(diffusion, "original_num_steps", n))
    if original != n or (kept is not None and not np.array_equal(np.asarray(kept), np.arange(n))):
        raise ValueError(
            f"DPM-Solver needs the unspaced diffusion (all {original} training steps; it chooses its own "
            f"`steps` times), but this one is respaced to {n} steps: build it without timestep_respacing "
            f"(timestep_respacing='') and pass steps= to the solver instead"
        )


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the number of model evaluations), got {steps!r}")


def _check_plan(diffusion, steps, order, skip_type) -> str:
    _check_unspaced(diffusion)
    mean_type = getattr(diffusion, "model_mean_type", "eps")
    if mean_type not in ("eps", "xstart"):
        raise ValueError(f"DPM-Solver supports eps- or x0-predicting models, got model_mean_type {mean_type!r}")
    _check_steps(steps)
    if isinstance(order, bool) or order not in SUPPORTED_ORDERS:
        hint = " (third order, 3M, is not implemented here)" if order == 3 else ""
        raise ValueError(f"order must be 1 or 2{hint}, got {order!r}; use order=2 (DPM-Solver++(2M)) for guided sampling")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose one of {', '.join(SKIP_TYPES)}")
    return mean_type


def _check_arguments(diffusion, shape, noise, steps, order, skip_type, model_kwargs) -> tuple:
    _check_plan(diffusion, steps, order, skip_type)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints [B, C, ...], got {shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, C, ...] with positive sizes, got {shape}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise (x_T) has shape {tuple(noise.shape)} but shape is {shape}; pass matching ones")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a dict (e.g. {{'y': labels}}) or None, got {type(model_kwargs).__name__}")
    return shape


# --------------------------------------------------------------------------------------------
# The sampler


def _plan(schedule: ContinuousSchedule, steps: int, order: int, skip_type: str, lower_order_final: bool,
          t_start: float = 1.0):
    """Everything the loop needs, as Python floats: per evaluation (network time, alpha, sigma)
    and per update (order, coefficient of x, of D0, of D0 - D1)."""
    grid = time_grid(schedule, steps, skip_type, t_start)
    alpha, sigma, lam = schedule.alpha(grid), schedule.sigma(grid), schedule.lam(grid)
    net_t = schedule.network_time(grid)
    evals = [(float(net_t[k]), float(alpha[k]), float(sigma[k])) for k in range(steps)]
    updates = []
    for k, step_order in enumerate(step_orders(steps, order, lower_order_final), start=1):
        h = lam[k] - lam[k - 1]
        phi = math.expm1(-h)
        c_x, c_d0 = sigma[k] / sigma[k - 1], -alpha[k] * phi
        c_diff = 0.0
        if step_order == 2:
            r = (lam[k - 1] - lam[k - 2]) / h
            c_diff = -0.5 * alpha[k] * phi / r
        updates.append((step_order, float(c_x), float(c_d0), float(c_diff)))
    return evals, updates


class DPMSolverPlan:
    """One DPM-Solver++ run's schedule, checked and computed once, with the two operations of a step.

    `DPMSolverPlan(diffusion, steps, order=2, skip_type="time_uniform", lower_order_final=True,
    thresholding=False, start_timestep=None)` (the unspaced diffusion; ValueError naming the fix
    otherwise). `start_timestep`: the original timestep (fractional allowed) of the first
    evaluation; None: default_start (index N-1 for linear schedules, 995.08 for cosine). Evaluation k
    (0 <= k < steps) is `data_prediction(model, x, k, cond_fn, model_kwargs)`: one model call and
    one cond_fn call at grid point k, returning the (guided, optionally thresholded) x0. Update
    k (1 <= k <= steps) is `update(x, k, d0, d1)`: the state at grid point k from the state at
    k - 1, the latest prediction d0 and the one before it d1 (None for a first-order update).
    `dpm_solver_sample_loop` is these two in turn; callers that split a batch into chunks (the
    sampling job) run them chunk by chunk. Both work row by row, so a row's result does not depend
    on the other rows, and neither synchronises with the device.
    """

    def __init__(self, diffusion, steps: int, order: int = 2, skip_type: str = "time_uniform",
                 lower_order_final: bool = True, thresholding: bool = False, start_timestep: float | None = None):
        self.mean_type = _check_plan(diffusion, steps, order, skip_type)
        self.steps, self.order, self.skip_type = int(steps), int(order), skip_type
        self.thresholding = bool(thresholding)
        self.schedule = ContinuousSchedule(diffusion.alphas_cumprod)
        n = self.schedule.num_timesteps
        if start_timestep is None:
            t_start = default_start(self.schedule)
        else:
            if isinstance(start_timestep, bool) or not isinstance(start_timestep, (int, float)) or \
                    not math.isfinite(start_timestep) or not 0 < start_timestep <= n - 1:
                raise ValueError(f"start_timestep must be an original timestep in (0, {n - 1}], got {start_timestep!r}")
            t_start = (float(start_timestep) + 1.0) / n
        self.evals, self.updates = _plan(self.schedule, self.steps, self.order, skip_type, bool(lower_order_final),
                                         t_start)
        self.start_timestep = self.evals[0][0]

    def network_times(self) -> list[float]:
        """The float times (original index scale) of the `steps` evaluations, in order."""
        return [e[0] for e in self.evals]

    def data_prediction(self, model: Callable, x: torch.Tensor, k: int, cond_fn: Optional[Callable] = None,
                        model_kwargs: Optional[dict] = None) -> torch.Tensor:
        """x0 predicted at grid point k (float32 times N t - 1 to the model and cond_fn)."""
        net_t, alpha, sigma = self.evals[k]
        model_kwargs = model_kwargs or {}
        channels = x.shape[1]
        t = torch.full((x.shape[0],), net_t, dtype=torch.float32, device=x.device)
        out = model(x, t, **model_kwargs)
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        elif out.shape[1] != channels:
            raise ValueError(
                f"the model output has {out.shape[1]} channels; expected {channels} (eps or x0) or "
                f"{2 * channels} (with learned sigma) for inputs of {channels} channels"
            )
        out = out.to(x.dtype)
        gradient = None if cond_fn is None else cond_fn(x, t, **model_kwargs).to(x.dtype)
        if self.mean_type == "xstart":
            x0 = out
            if gradient is not None:
                # eps - sigma g, written for x0: (x - sigma eps') / alpha = x0 + sigma^2 / alpha g.
                x0 = x0 + (sigma * sigma / alpha) * gradient
        else:
            eps = out if gradient is None else out - sigma * gradient
            x0 = (x - sigma * eps) / alpha
        return dynamic_threshold(x0) if self.thresholding else x0

    def update(self, x: torch.Tensor, k: int, d0: torch.Tensor, d1: Optional[torch.Tensor]) -> torch.Tensor:
        """The state at grid point k (1-based update index) from the state at k - 1."""
        step_order, c_x, c_d0, c_diff = self.updates[k - 1]
        if step_order == 2:
            return c_x * x + c_d0 * d0 + c_diff * (d0 - d1)
        return c_x * x + c_d0 * d0


def dpm_solver_sample_loop(
    diffusion,
    model: Callable,
    shape: Sequence[int],
    noise: Optional[torch.Tensor] = None,
    cond_fn: Optional[Callable] = None,
    model_kwargs: Optional[dict] = None,
    device=None,
    progress: bool = False,
    *,
    steps: int = 20,
    order: int = 2,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
    thresholding: bool = False,
    step_noise: Optional[Callable] = None,
    start_timestep: Optional[float] = None,
) -> torch.Tensor:
    """Sample with multistep DPM-Solver++ in `steps` model evaluations; returns x at index 0.

    - `diffusion`: the UNSPACED GaussianDiffusion of the model (a respaced one is a ValueError);
      its alphas_cumprod and model_mean_type ("eps" or "xstart") are used.
    - `model(x, t, **model_kwargs)` with t float32 [B] on the original index scale (N t - 1; 999.0
      at the first call for N = 1000). A 2C-channel output (learned sigma) uses its first C
      channels. Classifier-free guidance: pass a guidance.ClassifierFreeGuidance-wrapped model.
    - `cond_fn(x, t, **model_kwargs)` returns scale * grad_x log p(y | x, t) (classifier_cond_fn);
      it shifts eps to eps - sigma(t) * cond_fn, as in the paper's DDIM guidance.
    - `noise`: x_T (its dtype sets the maths); default `step_noise(like)` if given (the solver is
      deterministic, so it only draws x_T) else torch.randn on `device` (default: noise's, else
      the model's first parameter's, else CPU).
    - `steps` >= 1 evaluations; `order` 1 or 2; `skip_type` one of "time_uniform", "logSNR",
      "time_quadratic"; `lower_order_final` lowers the final orders when steps < 10;
      `thresholding` applies dynamic thresholding (0.995 quantile) to each predicted x0;
      `start_timestep` is the original timestep of the first evaluation (None: default_start).
    The result is not clipped. Arguments are checked once here (ValueError naming the fix).
    """
    shape = _check_arguments(diffusion, shape, noise, steps, order, skip_type, model_kwargs)
    plan = DPMSolverPlan(diffusion, steps, order, skip_type, lower_order_final, thresholding, start_timestep)

    device = loop_device(model, noise, device)
    if noise is not None:
        x = noise.to(device)
    elif step_noise is not None:
        x = step_noise(torch.empty(shape, device=device))
    else:
        x = torch.randn(*shape, device=device)

    indices = range(1, plan.steps + 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    with torch.no_grad():
        d0 = plan.data_prediction(model, x, 0, cond_fn, model_kwargs)
        d1 = None
        for k in indices:
            x = plan.update(x, k, d0, d1)
            if k < plan.steps:
                d1, d0 = d0, plan.data_prediction(model, x, k, cond_fn, model_kwargs)
    return x
