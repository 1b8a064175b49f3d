"""Guided sampling of one batch: the networks in their precision, classifier and classifier-free
guidance, fixed rows per network call, and per-index noise streams.
"""
from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from launch.choices import default_sampler, dpm_solver_steps


class _NoiseStream:
    """The per-sample noise of one batch: x_T, then one draw per stochastic step, in order.

    Rows come from CPU generators (one per index), so the numbers are the same on every device.
    On a GPU the next draw is made on a helper thread while the current step runs, so drawing
    ~B*3*H*W normals per step on the CPU does not stall the accelerator.
    """

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device, prefetch: bool):
        from diffusion_core.diffusion import PerSampleNoise

        self._noise = PerSampleNoise(seeds)
        self._like = torch.empty((len(seeds), *shape))
        self._device = device
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._next = self._pool.submit(self._draw) if self._pool else None

    def _draw(self) -> torch.Tensor:
        out = self._noise(self._like)
        return out.pin_memory() if self._device.type == "cuda" else out

    def next(self) -> torch.Tensor:
        """The next draw, on the sampling device."""
        if self._pool is None:
            out = self._draw()
        else:
            out = self._next.result()
            self._next = self._pool.submit(self._draw)
        return out.to(self._device, non_blocking=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes, bytes): the same for every file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Network(nn.Module):
    """A network under the run's precision, answering in float32 so that the diffusion and guidance
    arithmetic around it stays float32. Drops labels an unconditional model would refuse."""

    def __init__(self, net: nn.Module, precision: str, device: torch.device, takes_labels: bool):
        super().__init__()
        self.net, self.precision, self.device, self.takes_labels = net, precision, device, takes_labels

    def forward(self, x, t, y=None, **kwargs):
        from launch.precision import autocast

        if not self.takes_labels:
            y = None
        with autocast(self.precision, self.device):
            out = self.net(x, t, y=y, **kwargs) if y is not None else self.net(x, t, **kwargs)
        return out.float()


def load_network(spec: str, preset: str | None, what: str):
    """Load --model / --classifier (`what` names it in errors) on the CPU -> (module, Preset)."""
    from launch.model_io import load_model

    if not spec.startswith("openai:") and not Path(spec).exists():
        raise FileNotFoundError(f"{what} {spec!r} not found: give our model file, openai:FILE or a run directory")
    module, resolved = load_model(spec, preset=preset, device="cpu")
    return module, resolved


# --------------------------------------------------------------------------------------------
# the sampler of one batch
# --------------------------------------------------------------------------------------------
class GuidedSampler:
    """Runs the reverse process for a batch, one `step` at a time, with per-sample noise.

    Built from loaded networks; holds the diffusion (respaced for DDPM / DDIM, unspaced for
    DPM-Solver++), the guided model function and cond_fn. A DDPM or DDIM `step` is exactly
    `diffusion.p_sample` / `ddim_sample` with the guidance applied; a DPM-Solver++ step is one
    evaluation and one update of diffusion_core.dpm_solver.DPMSolverPlan. `steps` is a respacing
    string or "dpm++2m-N" / "dpm++1-N"; `skip_type`, `thresholding` and `solver_start` (the original
    timestep of the first evaluation; None: DPMSolverPlan's default) are DPM-Solver++ options.
    """

    def __init__(self, model: nn.Module, model_preset, *, steps: str = "250", sampler: str | None = None,
                 eta: float = 0.0, classifier: nn.Module | None = None,
                 classifier_scale: float | str | None = None, cfg_scale: float | str | None = None,
                 precision: str = "fp32", clip_denoised: bool = True, device: torch.device | str = "cpu",
                 network_batch: int | None = None, skip_type: str | None = None, thresholding: bool = False,
                 solver_start: float | None = None):
        from diffusion_core.guidance import guided_sampling, parse_guidance_scale

        self.device = torch.device(device)
        self.network_batch = None if network_batch is None else int(network_batch)
        self.preset = model_preset
        cfg = model_preset.model
        self.kind = sampler or default_sampler(steps)
        self.plan = None
        if self.kind == "dpm++":
            self.diffusion, self.plan = _dpm_solver_plan(model_preset.diffusion, steps, skip_type, thresholding,
                                                         solver_start)
        else:
            self.diffusion = dataclasses.replace(model_preset.diffusion, timestep_respacing=str(steps)).build()
        self.eta = float(eta)
        self.clip_denoised = clip_denoised
        self.image_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.super_resolution = bool(getattr(cfg, "super_resolution", False))
        self.class_cond = cfg.num_classes is not None
        total = model_preset.diffusion.steps
        net = _Network(model, precision, self.device, self.class_cond)
        clf = _Network(classifier, precision, self.device, False) if classifier is not None else None
        null_label = None
        if cfg_scale is not None:
            if not (self.class_cond and getattr(cfg, "null_class", False)):
                raise ValueError("cfg_scale needs a model trained with a null class (classifier-free guidance); "
                                 "this model has none: drop --cfg-scale or use such a model")
            null_label = cfg.num_classes
            cfg_scale = parse_guidance_scale(cfg_scale, total)
        if classifier_scale is None:
            classifier_scale = 1.0 if classifier is not None else 0.0
        classifier_scale = parse_guidance_scale(classifier_scale, total)
        self.model_fn, self.cond_fn = guided_sampling(net, clf, classifier_scale, cfg_scale, null_label)
        self.stochastic = self.kind == "ddpm" or (self.kind == "ddim" and self.eta != 0)

    @property
    def num_steps(self) -> int:
        """Steps of the loop: respaced timesteps (DDPM, DDIM) or network evaluations (DPM-Solver++)."""
        return self.plan.steps if self.plan is not None else self.diffusion.num_timesteps

    def model_kwargs(self, labels: torch.Tensor | None, low_res: torch.Tensor | None) -> dict:
        """The keyword arguments every model and cond_fn call receives."""
        kwargs = {}
        if labels is not None and (self.class_cond or self.cond_fn is not None):
            kwargs["y"] = labels
        if self.super_resolution:
            kwargs["low_res"] = low_res
        return kwargs

    def step(self, x: torch.Tensor, i: int, model_kwargs: dict, noise: torch.Tensor | None,
             pred_prev: torch.Tensor | None = None) -> dict:
        """One reverse step, i counting down from num_steps - 1 to 0; returns `sample` and `pred_xstart`.

        DDPM / DDIM: i is the respaced index and the dict is the diffusion core's. DPM-Solver++:
        step i evaluates the networks at the current grid point and updates to the next one, using
        the previous step's `pred_xstart` as `pred_prev` (None at the first step); `noise` is unused.
        With a `network_batch` other than the batch's size the step runs chunk by chunk, each chunk
        padded to exactly `network_batch` rows (copies of its last row, computed and dropped): the
        step of a row is independent of the other rows, and kernels then always see the same shape.
        """
        n, c = x.shape[0], self.network_batch
        if c is None or c == n:
            return self._step(x, i, model_kwargs, noise, pred_prev)
        parts = []
        for start in range(0, n, c):
            stop = min(start + c, n)

            def rows(v):
                return _padded_rows(v, start, stop, c) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v

            out = self._step(rows(x), i, {k: rows(v) for k, v in model_kwargs.items()}, rows(noise), rows(pred_prev))
            parts.append({k: v[: stop - start] for k, v in out.items() if torch.is_tensor(v) and v.ndim})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _step(self, x: torch.Tensor, i: int, model_kwargs: dict, noise: torch.Tensor | None,
              pred_prev: torch.Tensor | None) -> dict:
        if self.plan is not None:
            k = self.plan.steps - 1 - i  # evaluation k, then update k + 1
            with torch.no_grad():
                pred = self.plan.data_prediction(self.model_fn, x, k, self.cond_fn, model_kwargs)
                return {"sample": self.plan.update(x, k + 1, pred, pred_prev), "pred_xstart": pred}
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        with torch.no_grad():
            if self.kind == "ddim":
                return self.diffusion.ddim_sample(self.model_fn, x, t, self.clip_denoised, self.cond_fn,
                                                  model_kwargs, eta=self.eta, noise=noise)
            if noise is None:
                noise = torch.zeros_like(x)  # t == 0 adds no noise; never fall back to the global RNG
            return self.diffusion.p_sample(self.model_fn, x, t, self.clip_denoised, self.cond_fn,
                                           model_kwargs, noise=noise)

    def sample(self, seeds: Sequence[int], labels: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Samples (float32, NCHW; in [-1, 1] except DPM-Solver++'s, which are not clipped) for one
        batch; row k uses generator `seeds[k]`.

        Draws x_T first, then the noise of every stochastic step that adds noise (none at the
        last step, none for DDIM with eta = 0 or DPM-Solver++): the same order as the core's loops
        with `PerSampleNoise`, so both give the same numbers, and x_T of an index is the same for
        every sampler. `on_step` is called after each step.
        """
        kwargs = self.model_kwargs(labels, low_res)
        stream = _NoiseStream(seeds, self.image_shape, self.device, prefetch=self.device.type == "cuda")
        try:
            x, pred = stream.next(), None
            for i in reversed(range(self.num_steps)):
                noise = stream.next() if (self.stochastic and i > 0) else None
                out = self.step(x, i, kwargs, noise, pred)
                x, pred = out["sample"], out["pred_xstart"] if self.plan is not None else None
                if on_step is not None:
                    on_step()
        finally:
            stream.close()
        return x


def _dpm_solver_plan(diffusion_config, steps: str, skip_type: str | None, thresholding: bool,
                     solver_start: float | None = None):
    """The unspaced diffusion and the DPM-Solver++ plan of a "dpm++2m-N" / "dpm++1-N" steps string."""
    from diffusion_core.dpm_solver import DPMSolverPlan

    order, evaluations = dpm_solver_steps(steps)
    if evaluations > diffusion_config.steps:
        raise ValueError(f"steps {steps!r} asks for {evaluations} evaluations, more than the model's "
                         f"{diffusion_config.steps} training steps; DPM-Solver++ needs far fewer (10-25)")
    diffusion = dataclasses.replace(diffusion_config, timestep_respacing="").build()
    return diffusion, DPMSolverPlan(diffusion, evaluations, order, skip_type or "time_uniform",
                                    thresholding=thresholding, start_timestep=solver_start)


def _padded_rows(v: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows start:stop of `v`, filled up to `rows` rows with copies of the last one."""
    part = v[start:stop]
    if part.shape[0] == rows:
        return part
    return torch.cat([part, part[-1:].expand(rows - part.shape[0], *part.shape[1:])])


