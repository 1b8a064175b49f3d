# Over 600 lines by choice: one object holds the process's forward, reverse, loss and loop maths, read in one place.
"""Gaussian diffusion as in ADM: the process, the hybrid loss, DDPM and DDIM samplers (schedules and
respacing in schedules.py, likelihood terms in likelihood.py, per-sample noise in noise.py).

All schedule tables are float64 numpy arrays. Per-timestep coefficients are gathered from
float64 torch copies and cast to the dtype of the tensor they multiply, so float32 inputs give the
original code's float32 numerics and float64 inputs give float64 results.

Timestep convention: every method takes `t` as indices of *this* (possibly respaced) process,
0 <= t < num_timesteps. The model and cond_fn are always called with the ORIGINAL timesteps
`timestep_map[t]` (int64), because the released networks were trained on 0..999.

Randomness: every stochastic step takes an explicit `noise` tensor; the loops take `noise` (x_T)
and `step_noise(like) -> tensor shaped like `like`` so a caller can give every sample index its
own generator (see `PerSampleNoise`) and get results that do not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from diffusion_core.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion_core.noise import PerSampleNoise, loop_device
from diffusion_core.schedules import NOISE_SCHEDULES, get_named_beta_schedule, space_timesteps

__all__ = ["DiffusionConfig", "GaussianDiffusion", "NOISE_SCHEDULES", "PerSampleNoise", "create_diffusion",
           "discretized_gaussian_log_likelihood", "get_named_beta_schedule", "mean_flat", "normal_kl",
           "space_timesteps"]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DiffusionConfig:
    """Configuration of a diffusion process; `.build()` returns the process object.

    Fields mirror guided-diffusion's flags: `steps` of the training chain, `noise_schedule`
    ("linear" | "cosine"), `learn_sigma` (the model outputs 2*C channels: eps | v),
    `predict_xstart` (the model predicts x0 instead of eps), `sigma_small` (fixed small instead of
    fixed large variance when sigma is not learned), `use_kl` (train on the variational bound
    only, rescaled: vb x T, as the original's flags select whatever `rescale_learned_sigmas` says),
    `rescale_learned_sigmas` (without `use_kl`: the rescaled hybrid, vb x T/1000), `timestep_respacing`
    ("" | "250" | "10,10,10" | "ddim25").
    """

    steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    predict_xstart: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    timestep_respacing: str = ""

    def build(self) -> "GaussianDiffusion":
        """Build the diffusion object described by this config."""
        return create_diffusion(**asdict(self))


def create_diffusion(
    steps: int = 1000,
    noise_schedule: str = "linear",
    timestep_respacing: str = "",
    learn_sigma: bool = True,
    predict_xstart: bool = False,
    sigma_small: bool = False,
    use_kl: bool = False,
    rescale_learned_sigmas: bool = False,
) -> "GaussianDiffusion":
    """Build a (possibly respaced) Gaussian diffusion process with ADM's conventions.

    `timestep_respacing` keeps a subset of the `steps` original timesteps (see
    `space_timesteps`); "" keeps all of them. Raises ValueError for an unknown schedule or a
    respacing string that does not fit `steps`.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    betas = get_named_beta_schedule(noise_schedule, int(steps))
    use_timesteps = space_timesteps(int(steps), timestep_respacing or "")
    if use_kl:
        # The original's flags never reach its plain KL: use_kl always means the rescaled KL.
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return GaussianDiffusion(
        betas,
        use_timesteps=use_timesteps,
        model_mean_type="xstart" if predict_xstart else "eps",
        model_var_type=var_type,
        loss_type=loss_type,
    )


# --------------------------------------------------------------------------------------------
# The process


_TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
    "fixed_large_variance",
    "fixed_large_log_variance",
)

MODEL_MEAN_TYPES = ("eps", "xstart")
MODEL_VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


class GaussianDiffusion:
    """A Gaussian diffusion chain over the kept timesteps of a base schedule.

    `betas` is the float64 schedule of the original chain; `use_timesteps` the sorted original
    indices kept (None = all). The respaced chain keeps abar at those indices and rebuilds
    beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}. Attributes: `num_timesteps`, `original_num_steps`,
    `timestep_map` (int64 numpy, original index of each step) and the float64 numpy tables
    `betas`, `alphas_cumprod`, `alphas_cumprod_prev`, `alphas_cumprod_next`,
    `posterior_variance`, `posterior_log_variance_clipped`, `posterior_mean_coef1`,
    `posterior_mean_coef2` (and the square-root helpers).
    """

    def __init__(
        self,
        betas: np.ndarray,
        use_timesteps: Optional[Sequence[int]] = None,
        model_mean_type: str = "eps",
        model_var_type: str = "learned_range",
        loss_type: str = "mse",
    ):
        if model_mean_type not in MODEL_MEAN_TYPES:
            raise ValueError(f"model_mean_type {model_mean_type!r}: choose one of {MODEL_MEAN_TYPES}")
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type {model_var_type!r}: choose one of {MODEL_VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}: choose one of {LOSS_TYPES}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        base_betas = np.asarray(betas, dtype=np.float64)
        if base_betas.ndim != 1 or not ((base_betas > 0).all() and (base_betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.original_num_steps = len(base_betas)
        if use_timesteps is None:
            kept = list(range(self.original_num_steps))
            new_betas = base_betas
        else:
            kept = sorted(set(int(k) for k in use_timesteps))
            if not kept or kept[0] < 0 or kept[-1] >= self.original_num_steps:
                raise ValueError(
                    f"use_timesteps must be non-empty indices in [0, {self.original_num_steps})"
                )
            base_abar = np.cumprod(1.0 - base_betas)
            previous = 1.0
            rebuilt = []
            for k in kept:
                rebuilt.append(1.0 - base_abar[k] / previous)
                previous = base_abar[k]
            new_betas = np.array(rebuilt, dtype=np.float64)
        self.timestep_map = np.array(kept, dtype=np.int64)
        self._build_tables(new_betas)
        self._device_cache: dict = {}

    # ---------------------------------------------------------------- tables

    def _build_tables(self, betas: np.ndarray) -> None:
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t=0; its log would be -inf, so t=0 borrows t=1's value.
        if self.num_timesteps > 1:
            clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        else:
            clipped = np.array([betas[0]], dtype=np.float64)
        self.posterior_log_variance_clipped = np.log(clipped)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        # "Fixed large" uses beta_t, except at t=0 where the posterior variance of t=1 gives a
        # better decoder likelihood.
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.fixed_large_variance = betas.copy()
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    def _tables_on(self, device: torch.device) -> dict:
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is None:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            cached = {name: torch.as_tensor(getattr(self, name), dtype=dtype).to(device) for name in _TABLE_NAMES}
            cached["timestep_map"] = torch.as_tensor(self.timestep_map, dtype=torch.int64).to(device)
            self._device_cache[key] = cached
        return cached

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at t, cast to like's dtype, broadcast to like's shape."""
        values = self._tables_on(t.device)[name][t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1))).expand(like.shape)

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map indices of this process to the original chain's timesteps (int64, same device)."""
        return self._tables_on(t.device)["timestep_map"][t]

    def _check_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """Validate timesteps without waiting for the device (every public method calls this).

        Type, dtype and shape are host metadata; the range is checked with an asynchronous device
        assert, so a GPU step never stalls on it (on the CPU it fails at once, with the values).
        """
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"timesteps must be a torch.Tensor of integers, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be an integer tensor (int64), got dtype {t.dtype}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"timesteps must have shape [batch] = [{x.shape[0]}], got {tuple(t.shape)}"
            )
        if t.numel():
            try:
                torch._assert_async(((t >= 0) & (t < self.num_timesteps)).all(), "timesteps out of range")
            except RuntimeError:
                raise ValueError(
                    f"timesteps out of range: got values in [{int(t.min())}, {int(t.max())}] but this "
                    f"process has {self.num_timesteps} steps (valid 0..{self.num_timesteps - 1}; pass "
                    f"respaced indices, not original timesteps)"
                ) from None
        return t.long()

    # ---------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check_t(t, x_start)
        mean = self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._gather("alphas_cumprod", t, x_start)
        log_variance = self._gather("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) * noise.to(x_start.dtype)
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._check_t(t, x_t)
        mean = (
            self._gather("posterior_mean_coef1", t, x_t) * x_start
            + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._gather("posterior_variance", t, x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ---------------------------------------------------------------- reverse process

    def _call_model(self, model, x, t, model_kwargs):
        output = model(x, self.original_timesteps(t), **(model_kwargs or {}))
        # Under autocast the network may answer in bf16/fp16; the diffusion maths runs in x's dtype.
        return output.to(x.dtype) if output.dtype != x.dtype else output

    def _split_output(self, model_output, x):
        channels = x.shape[1]
        if self.model_var_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learn_sigma is on, so the model must output 2*C = {2 * channels} channels "
                    f"(eps | v), but it gave {model_output.shape[1]}; build the diffusion with "
                    f"learn_sigma=False or the model with learned sigma"
                )
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(
                f"the model output has {model_output.shape[1]} channels but the input has {channels}; "
                f"a model with learned sigma needs learn_sigma=True"
            )
        return model_output, None

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """p(x_{t-1} | x_t) given the raw model output (shared by sampling and the loss)."""
        prediction, var_values = self._split_output(model_output, x)
        if self.model_var_type == "learned_range":
            min_log = self._gather("posterior_log_variance_clipped", t, x)
            max_log = self._gather("log_betas", t, x)
            # The network's v in [-1, 1] interpolates between the two variance bounds in log space.
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == "fixed_large":
            variance = self._gather("fixed_large_variance", t, x)
            log_variance = self._gather("fixed_large_log_variance", t, x)
        else:
            variance = self._gather("posterior_variance", t, x)
            log_variance = self._gather("posterior_log_variance_clipped", t, x)

        if self.model_mean_type == "xstart":
            pred_xstart = prediction
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, prediction)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None, *, denoised_fn=None):
        """Apply the model to get p(x_{t-1} | x_t).

        Returns a dict with `mean`, `variance`, `log_variance` (all shaped like x) and
        `pred_xstart` (clamped to [-1, 1] when clip_denoised). `denoised_fn`, if given, maps
        pred_xstart before clipping.
        """
        t = self._check_t(t, x)
        output = self._call_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance for ancestral sampling: mean + variance * cond_fn(x_t, t_orig).

        The gradient is taken at x_t (not at the mean), as in the paper's Algorithm 1.
        """
        t = self._check_t(t, x)
        gradient = cond_fn(x, self.original_timesteps(t), **(model_kwargs or {}))
        mean = p_mean_var["mean"]
        return mean + p_mean_var["variance"].to(mean.dtype) * gradient.to(mean.dtype)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance for DDIM (Algorithm 2): shift the score, eps' = eps - sqrt(1-abar) g.

        Returns a copy of p_mean_var with `pred_xstart` recomputed from eps' (not re-clipped),
        `mean` the posterior mean from it, and `eps` = eps'.
        """
        t = self._check_t(t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        gradient = cond_fn(x, self.original_timesteps(t), **(model_kwargs or {}))
        eps = eps - self._gather("sqrt_one_minus_alphas_cumprod", t, x) * gradient.to(x.dtype)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        out["eps"] = eps
        return out

    def p_sample(
        self, model, x, t, clip_denoised=True, cond_fn=None, model_kwargs=None, noise=None,
        *, denoised_fn=None,
    ):
        """One ancestral step x_t -> x_{t-1}; returns dict `sample`, `pred_xstart` (unguided).

        `noise` (shaped like x) is used as is; None draws torch.randn_like(x). No noise is added
        at t == 0.
        """
        t = self._check_t(t, x)
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x shape {tuple(x.shape)}")
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn=denoised_fn)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        noise = torch.randn_like(x) if noise is None else noise.to(x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self, model, x, t, clip_denoised=True, cond_fn=None, model_kwargs=None, eta=0.0, noise=None,
        *, denoised_fn=None,
    ):
        """One DDIM step x_t -> x_{t-1} with stochasticity `eta` (0 = deterministic).

        eps is recomputed from the (clipped) pred_xstart; with cond_fn the score is shifted first
        (condition_score). `noise` is used only when eta != 0 (None draws randn_like).
        Returns dict `sample`, `pred_xstart`.
        """
        t = self._check_t(t, x)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x shape {tuple(x.shape)}")
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn=denoised_fn)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._gather("alphas_cumprod", t, x)
        abar_prev = self._gather("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1.0 - abar_prev - sigma**2) * eps
        if eta != 0:
            noise = torch.randn_like(x) if noise is None else noise.to(x.dtype)
            nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0, *, denoised_fn=None):
        """Deterministic DDIM step x_t -> x_{t+1} (encoding); only eta == 0 is defined."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic: eta must be 0, got {eta}")
        t = self._check_t(t, x)
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs, denoised_fn=denoised_fn)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar_next = self._gather("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(abar_next) + torch.sqrt(1.0 - abar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---------------------------------------------------------------- loops

    def _initial(self, model, shape, noise, device, step_noise):
        device = loop_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise (x_T) has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
            return noise.to(device)
        if step_noise is not None:
            return step_noise(torch.empty(tuple(shape), device=device))
        return torch.randn(*shape, device=device)

    @staticmethod
    def _indices(n, progress):
        indices = list(range(n))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, *, step_noise=None,
    ):
        """Ancestral sampling from x_T to x_0; returns the final sample.

        `noise` is x_T (default: standard normal, or `step_noise` if given); `step_noise(like)`
        supplies the noise of every step (default torch.randn_like). Its dtype sets the maths.
        """
        final = None
        for out in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress,
            step_noise=step_noise,
        ):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, *, step_noise=None,
    ) -> Iterator[dict]:
        """Like p_sample_loop, but yields each step's dict (`sample`, `pred_xstart`, `t`)."""
        img = self._initial(model, shape, noise, device, step_noise)
        draw = step_noise or torch.randn_like
        for i in self._indices(self.num_timesteps, progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=img.device)
            with torch.no_grad():
                noise_i = draw(img) if i > 0 else torch.zeros_like(img)
                out = self.p_sample(model, img, t, clip_denoised, cond_fn, model_kwargs, noise_i,
                                    denoised_fn=denoised_fn)
            out["t"] = t
            yield out
            img = out["sample"]

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, *, step_noise=None,
    ):
        """DDIM sampling from x_T to x_0 (eta = 0: deterministic); returns the final sample."""
        final = None
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress,
            eta, step_noise=step_noise,
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
        model_kwargs=None, device=None, progress=False, eta=0.0, *, step_noise=None,
    ) -> Iterator[dict]:
        """Like ddim_sample_loop, but yields each step's dict (`sample`, `pred_xstart`, `t`)."""
        img = self._initial(model, shape, noise, device, step_noise)
        draw = step_noise or torch.randn_like
        for i in self._indices(self.num_timesteps, progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=img.device)
            step_noise_tensor = draw(img) if (eta != 0 and i > 0) else None
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised, cond_fn, model_kwargs, eta, step_noise_tensor,
                                       denoised_fn=denoised_fn)
            out["t"] = t
            yield out
            img = out["sample"]

    def dpm_solver_sample_loop(
        self, model, shape, noise=None, cond_fn=None, model_kwargs=None, device=None, progress=False, *,
        steps=20, order=2, skip_type="time_uniform", lower_order_final=True, thresholding=False, step_noise=None,
        start_timestep=None,
    ):
        """Multistep DPM-Solver++ in `steps` network evaluations on this (unspaced) process; returns the
        final sample, not clipped. Networks and cond_fn get float32 times on the original index scale.
        See diffusion_core/dpm_solver.py and docs/sampling.md."""
        from diffusion_core.dpm_solver import dpm_solver_sample_loop

        return dpm_solver_sample_loop(
            self, model, shape, noise, cond_fn, model_kwargs, device, progress, steps=steps, order=order,
            skip_type=skip_type, lower_order_final=lower_order_final, thresholding=thresholding,
            step_noise=step_noise, start_timestep=start_timestep,
        )

    def ddim_reverse_sample_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """Encode x_0 to x_T with deterministic reverse DDIM steps (the inverse of eta=0 sampling)."""
        img = x_start
        indices = list(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((x_start.shape[0],), i, dtype=torch.long, device=x_start.device)
            with torch.no_grad():
                img = self.ddim_reverse_sample(model, img, t, clip_denoised, model_kwargs)["sample"]
        return img

    # ---------------------------------------------------------------- losses

    def _vb_from_output(self, model_output, x_start, x_t, t, clip_denoised):
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        # t == 0 is the decoder term of the bound; every other t a KL between Gaussians.
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The variational-bound term at t in bits per dimension (per sample).

        t > 0: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); t == 0: the discretized decoder NLL.
        Returns dict `output` [B] and `pred_xstart`.
        """
        t = self._check_t(t, x_t)
        output = self._call_model(model, x_t, t, model_kwargs)
        return self._vb_from_output(output, x_start, x_t, t, clip_denoised)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """The training loss for a batch at timesteps t; returns dict `loss`, `mse`, `vb` [B].

        mse/rescaled_mse: loss = mse + vb, where vb is the bound term (bits/dim) computed with
        the mean part of the output detached, so it trains only the variance channels
        (multiplied by T/1000 for rescaled_mse); without learned sigma vb is reported but not
        added. kl/rescaled_kl: loss = vb (times T for rescaled_kl); mse is reported only.
        """
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        x_t = self.q_sample(x_start, t, noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        prediction, var_values = self._split_output(model_output, x_start)
        target = x_start if self.model_mean_type == "xstart" else noise.to(x_start.dtype)
        mse = mean_flat((target - prediction) ** 2)

        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self._vb_from_output(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            loss = vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb
            return {"loss": loss, "mse": mse.detach(), "vb": vb}

        if var_values is not None:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            vb = self._vb_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_mse":
                # The original chain had 1000 steps; this keeps vb's weight when T differs.
                vb = vb * (self.num_timesteps / 1000.0)
            loss = mse + vb
        else:
            with torch.no_grad():
                vb = self._vb_from_output(model_output.detach(), x_start, x_t, t, clip_denoised=False)["output"]
            loss = mse
        return {"loss": loss, "mse": mse, "vb": vb}

    def _prior_bpd(self, x_start):
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        zero = torch.zeros_like(mean)
        return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False, *, step_noise=None):
        """Bits per dimension of x_start under the model: every term of the variational bound.

        Returns a dict of per-sample tensors: `total_bpd` [B] (sum of all terms + prior),
        `prior_bpd` [B] (KL of q(x_T|x_0) to N(0, I)), and per timestep [B, T] with column i =
        timestep i: `vb` (bound term), `xstart_mse`, `mse` (of the implied eps).
        `step_noise(like)` draws the q_sample noise (default torch.randn_like).
        """
        draw = step_noise or torch.randn_like
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        indices = list(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((batch,), i, dtype=torch.long, device=x_start.device)
            noise = draw(x_start)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                output = self._call_model(model, x_t, t, model_kwargs)
                out = self._vb_from_output(output, x_start, x_t, t, clip_denoised)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
