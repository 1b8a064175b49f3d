"""Memory and time plan of a job before it runs: `adm train --dry-run` and `adm sample --dry-run`.

Nothing is allocated: the networks are built on fake tensors (torch's FakeTensorMode: shapes and
dtypes, no storage), one training step (or one guided sampling step) is traced on them, and
`LiveBytes` follows every storage the step creates and frees, giving the step's peak of
activations (and gradients). The persistent state is counted from the parameter count and the
strategy's layout:

    DDP        weights 4P, gradients 4P, Adam 8P, EMA 4P per rate (all whole on every GPU)
    FSDP2      all of the above / world size, plus the all-gathered weights of the largest blocks
    ZeRO-1/2/3 bf16/fp16 weights (stage 3: / world), float32 master + Adam / world, gradient
               partitions and buckets, EMA whole (stage 3: / world)

The estimate is the peak of what torch's allocator hands out (`torch.cuda.max_memory_allocated`);
the CUDA context and the caching allocator's reserve come on top (about 0.5-1 GiB per GPU).
Time: images/s = MFU x peak FLOP/s x GPUs / FLOPs per image, at a stated MFU (default 40 %).
tests/launch/test_plan.py compares the estimate with the measured peak of a real CPU run.
"""
from __future__ import annotations

import dataclasses
import os
import re
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launch.precision import DTYPES, autocast
from launch.train import perf

GiB = 2 ** 30
DEFAULT_GPU = "NVIDIA H200"
DEFAULT_MFU = 0.4


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active and still alive; `peak` is the maximum.

    Works on real and on fake tensors (a fake tensor's storage knows its size). Storages that
    existed before (parameters, inputs made outside) are not counted; views add nothing.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if hasattr(t, "_local_tensor"):  # a DTensor: its shard is the memory (the wrapper has none)
            t = t._local_tensor
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._track(t)
        return out


def _example_batch(preset, batch: int):
    cfg = preset.model
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    kwargs = {}
    if preset.kind != "classifier" and getattr(cfg, "num_classes", None):
        kwargs["y"] = torch.randint(0, cfg.num_classes, (batch,))
    if getattr(cfg, "super_resolution", False):
        low = cfg.low_res_size or cfg.image_size // 4
        kwargs["low_res"] = torch.randn(batch, cfg.in_channels, low, low)
    return x, kwargs


def trace_training_step(preset, micro_batch: int, precision: str, keep_grads: bool,
                        weights_dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes one training micro-step creates (batch, activations, gradients if `keep_grads`).

    `keep_grads=False` frees each gradient as soon as it is complete, as FSDP's reduce-scatter and
    DeepSpeed's buckets do (and DDP, whose gradients live in preallocated buckets).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.nn.functional as F

    with FakeTensorMode():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(weights_dtype)  # fake parameters cannot be converted after the fact
        try:
            module = preset.build().train()
        finally:
            torch.set_default_dtype(previous)
        if not keep_grads:
            for p in module.parameters():
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        diffusion = dataclasses.replace(preset.diffusion, timestep_respacing="").build()
        device = torch.device("cpu")
        with LiveBytes() as live:
            x, kwargs = _example_batch(preset, micro_batch)
            t = torch.randint(0, diffusion.num_timesteps, (micro_batch,))
            with autocast(precision, device):
                if preset.kind == "classifier":
                    logits = module(diffusion.q_sample(x, t), t)
                    loss = F.cross_entropy(logits.float(), torch.zeros(micro_batch, dtype=torch.long))
                else:
                    def model_fn(*a, **k):
                        return module(*a, **k).float()
                    loss = diffusion.training_losses(model_fn, x, t, model_kwargs=kwargs)["loss"].mean()
            loss.backward()
        return live.peak


def _shard_units_max(module) -> int:
    from launch.train.strategies import shard_units

    return max((sum(p.numel() for p in u.parameters()) for u in shard_units(module)), default=0)


def training_memory(cfg, preset, world_size: int) -> dict[str, int]:
    """Bytes per GPU by component for a resolved training config on `world_size` GPUs."""
    from launch.train.config import ema_rates_of
    from launch.train.strategies import deepspeed_sizes

    with torch.device("meta"):
        module = preset.build()
    numels = [p.numel() for p in module.parameters()]
    P, W = sum(numels), world_size
    micro = cfg.batch_size // (W * cfg.grad_accum)
    k = len(ema_rates_of(cfg))
    half = cfg.precision in ("bf16", "fp16")
    parts: dict[str, int] = {}
    if cfg.strategy == "ddp":
        parts["weights (fp32)"] = 4 * P
        parts["Adam moments (fp32)"] = 8 * P
        parts[f"EMA x{k} (fp32)"] = 4 * P * k
        if W > 1:  # gradients live in DDP's buckets (gradient_as_bucket_view) for the whole step
            parts["gradients (DDP buckets)"] = 4 * P
            parts["activations (one micro-batch)"] = trace_training_step(preset, micro, cfg.precision, keep_grads=False)
        else:
            parts["activations + gradients"] = trace_training_step(preset, micro, cfg.precision, keep_grads=True)
    elif cfg.strategy == "fsdp":
        shard = cfg.fsdp_shard_size or W
        parts["weights (fp32, sharded)"] = 4 * P // shard
        parts["gradients (fp32, sharded)"] = 4 * P // shard
        parts["Adam moments (sharded)"] = 8 * P // shard
        parts[f"EMA x{k} (sharded)"] = 4 * P * k // shard
        # One block's weights all-gathered for compute, the next one prefetched, and in backward
        # its unsharded gradient before the reduce-scatter.
        parts["gathered blocks"] = 3 * 4 * _shard_units_max(module) if shard > 1 else 0
        parts["activations (one micro-batch)"] = trace_training_step(preset, micro, cfg.precision, keep_grads=False)
    elif cfg.strategy == "deepspeed":
        sizes = deepspeed_sizes(numels, "cuda")
        stage, wbytes = cfg.zero_stage, (2 if half else 4)
        parts["weights (" + ("bf16/fp16" if half else "fp32") + (", partitioned)" if stage == 3 else ")")] = (
            wbytes * P // (W if stage == 3 else 1))
        parts["fp32 master weights (partitioned)"] = 4 * P // W
        parts["Adam moments (partitioned)"] = 8 * P // W
        if stage >= 2:
            parts["gradient partition (fp32)"] = 4 * P // W
            parts["gradient buckets"] = 2 * wbytes * sizes["reduce_bucket_size"]
        else:
            parts["gradients"] = wbytes * P
        if stage == 3:
            parts["gathered weights (prefetch)"] = 2 * wbytes * sizes["stage3_prefetch_bucket_size"]
        parts[f"EMA x{k} (fp32" + (", partitioned)" if stage == 3 else ")")] = 4 * P * k // (W if stage == 3 else 1)
        weights_dtype = DTYPES[cfg.precision] if half else torch.float32
        parts["activations (one micro-batch)"] = trace_training_step(preset, micro, cfg.precision, keep_grads=False,
                                                                     weights_dtype=weights_dtype)
    else:
        raise ValueError(f"strategy={cfg.strategy!r} is not one of ddp, fsdp, deepspeed")
    return parts


def _gpu(name: str | None) -> tuple[str, perf.GpuPeaks | None]:
    if name is None:
        here = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        name = here if here and perf.gpu_peaks(here) else DEFAULT_GPU
    peaks = perf.gpu_peaks(name)
    if peaks is None:
        known = ", ".join(p.label for _, p in perf.GPU_PEAKS)
        raise ValueError(f"unknown GPU {name!r} for the plan; name one of: {known}")
    return name, peaks


def training_plan(cfg, preset, world_size: int, gpu: str | None = None, mfu: float = DEFAULT_MFU) -> dict:
    """The dry-run plan of a resolved training config: parameters, FLOPs, memory per GPU, speed."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size x grad_accum = "
                         f"{world_size} x {cfg.grad_accum}; change batch_size, grad_accum or --world-size")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must lie in (0, 1], got {mfu}")
    name, peaks = _gpu(gpu)
    with torch.device("meta"):
        params = sum(p.numel() for p in preset.build().parameters())
    flops = perf.flops_per_image(preset)
    parts = training_memory(cfg, preset, world_size)
    total = sum(parts.values())
    peak, source = perf.datasheet_peak(name, cfg.precision, tf32=True)
    images_per_s = mfu * peak * world_size / flops if peak else 0.0
    return {
        "job": "train", "preset": preset.name, "strategy": cfg.strategy, "precision": cfg.precision,
        "zero_stage": cfg.zero_stage if cfg.strategy == "deepspeed" else None,
        "world_size": world_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "micro_batch": cfg.batch_size // (world_size * cfg.grad_accum),
        "parameters": params, "gflop_per_image": flops / 1e9,
        "memory_per_gpu_bytes": parts, "peak_memory_per_gpu_gib": total / GiB,
        "gpu": peaks.label, "gpu_memory_gib": peaks.memory_gib,
        "fits": total < peaks.memory_gib * GiB * 0.95 if peaks.memory_gib else None,
        "peak_tflops": peak / 1e12, "peak_source": source, "mfu": mfu,
        "images_per_s": images_per_s,
        "step_s": cfg.batch_size / images_per_s if images_per_s else None,
        "hours_to_total_steps": cfg.total_steps * cfg.batch_size / images_per_s / 3600 if images_per_s else None,
    }


def sampling_steps(steps: str, total: int) -> int:
    """Network evaluations per sample of a `--steps` value (respacing string or dpm++...-N)."""
    from diffusion_core.diffusion import space_timesteps

    text = str(steps).strip()
    match = re.fullmatch(r"dpm[^-]*-(\d+)", text)
    if match:
        return int(match.group(1))
    try:
        return len(space_timesteps(total, text))
    except (ValueError, TypeError) as err:
        raise ValueError(f"--steps {steps!r}: {err}") from None


def _forward_flops(preset, with_input_grad: bool) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        module = preset.build().eval().requires_grad_(False)
        x, kwargs = _example_batch(preset, 1)
        t = torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False, custom_mapping=perf._cpu_attention_flops())
        with counter:
            if with_input_grad:
                x.requires_grad_(True)
                module(x, t).float().sum().backward()
            else:
                module(x, t, **kwargs)
    return int(counter.get_total_flops())


def trace_sampling_step(model_preset, clf_preset, batch: int, precision: str, cfg_guidance: bool) -> int:
    """Peak bytes of one guided DDPM step at `batch` rows (network outputs, classifier gradient)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device("cpu")
    with FakeTensorMode():
        model = model_preset.build().eval().requires_grad_(False)
        clf = clf_preset.build().eval().requires_grad_(False) if clf_preset is not None else None
        diffusion = dataclasses.replace(model_preset.diffusion, timestep_respacing="").build()
        with LiveBytes() as live:
            x, kwargs = _example_batch(model_preset, batch)
            t = torch.full((batch,), diffusion.num_timesteps - 1, dtype=torch.long)

            def model_fn(x, t, **kw):
                with autocast(precision, device):
                    if cfg_guidance:
                        out = model(torch.cat([x, x]), torch.cat([t, t]),
                                    **{k: torch.cat([v, v]) for k, v in kw.items()})
                        return out[: x.shape[0]].float()
                    return model(x, t, **kw).float()

            cond_fn = None
            if clf is not None:
                def cond_fn(x, t, y=None, **kw):
                    # What diffusion_core.guidance.classifier_cond_fn computes (its label check reads
                    # values, which fake tensors do not have): grad_x log p(y | x_t).
                    with torch.enable_grad():
                        x_in = x.detach().requires_grad_(True)
                        with autocast(precision, device):
                            logits = clf(x_in, t).float()
                        picked = torch.log_softmax(logits, -1).gather(1, y[:, None]).sum()
                        return torch.autograd.grad(picked, x_in)[0]
                kwargs.setdefault("y", torch.zeros(batch, dtype=torch.long))
            with torch.no_grad():
                diffusion.p_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs=kwargs, noise=torch.randn_like(x))
        return live.peak


def sampling_plan(model_preset, clf_preset, steps: str, batch: int, precision: str, cfg_guidance: bool,
                  world_size: int = 1, gpu: str | None = None, mfu: float = DEFAULT_MFU) -> dict:
    """The dry-run plan of `adm sample`: FLOPs per sample, memory per GPU, samples/s at an MFU."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must lie in (0, 1], got {mfu}")
    name, peaks = _gpu(gpu)
    n_steps = sampling_steps(steps, model_preset.diffusion.steps)
    with torch.device("meta"):
        model_params = sum(p.numel() for p in model_preset.build().parameters())
        clf_params = sum(p.numel() for p in clf_preset.build().parameters()) if clf_preset else 0
    per_step = _forward_flops(model_preset, False) * (2 if cfg_guidance else 1)
    if clf_preset is not None:
        per_step += _forward_flops(clf_preset, True)
    parts = {"model weights (fp32)": 4 * model_params, "classifier weights (fp32)": 4 * clf_params,
             "one step (batch, activations, guidance gradient)": trace_sampling_step(
                 model_preset, clf_preset, batch, precision, cfg_guidance)}
    total = sum(parts.values())
    peak, source = perf.datasheet_peak(name, precision, tf32=True)
    flops = per_step * n_steps
    rate = mfu * peak * world_size / flops if peak else 0.0
    return {
        "job": "sample", "preset": model_preset.name, "classifier": clf_preset.name if clf_preset else None,
        "precision": precision, "steps": n_steps, "batch_per_gpu": batch, "world_size": world_size,
        "parameters": model_params + clf_params, "gflop_per_step": per_step / 1e9, "gflop_per_sample": flops / 1e9,
        "memory_per_gpu_bytes": parts, "peak_memory_per_gpu_gib": total / GiB,
        "gpu": peaks.label, "gpu_memory_gib": peaks.memory_gib,
        "fits": total < peaks.memory_gib * GiB * 0.95 if peaks.memory_gib else None,
        "peak_tflops": peak / 1e12, "peak_source": source, "mfu": mfu, "samples_per_s": rate,
    }


def format_plan(plan: dict) -> str:
    """A human-readable table of a plan (what the dry runs print to stderr)."""
    lines = [f"plan: adm {plan['job']} {plan['preset']}"
             + (f" + {plan['classifier']}" if plan.get("classifier") else "")
             + f", {plan['precision']}, {plan['world_size']} GPU(s) ({plan['gpu']})"]
    if plan["job"] == "train":
        lines.append(f"  strategy {plan['strategy']}" + (f" (ZeRO-{plan['zero_stage']})" if plan["zero_stage"] else "")
                     + f", batch {plan['batch_size']} = {plan['world_size']} x {plan['grad_accum']} x "
                       f"{plan['micro_batch']} per micro-step")
        lines.append(f"  {plan['parameters']:,} parameters, {plan['gflop_per_image']:.1f} GFLOP per training "
                     "image (forward + backward)")
    else:
        lines.append(f"  {plan['parameters']:,} parameters, {plan['steps']} steps x {plan['gflop_per_step']:.1f} "
                     f"GFLOP = {plan['gflop_per_sample']:.0f} GFLOP per sample, batch {plan['batch_per_gpu']} per GPU")
    lines.append("  memory per GPU (torch allocator peak; CUDA context and allocator reserve extra):")
    for key, value in plan["memory_per_gpu_bytes"].items():
        if value:
            lines.append(f"    {key:<48} {value / GiB:8.2f} GiB")
    fits = plan["fits"]
    lines.append(f"    {'total':<48} {plan['peak_memory_per_gpu_gib']:8.2f} GiB of {plan['gpu_memory_gib']:g} GiB"
                 + ("" if fits is None else ("  (fits)" if fits else "  (DOES NOT FIT: lower the micro-batch, "
                                             "use fsdp / ZeRO, or more GPUs)")))
    what, rate = ("images", plan["images_per_s"]) if plan["job"] == "train" else ("samples", plan["samples_per_s"])
    lines.append(f"  at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:.0f} TFLOP/s ({plan['peak_source']}): "
                 f"{rate:,.1f} {what}/s on {plan['world_size']} GPU(s)")
    if plan["job"] == "train" and plan["step_s"]:
        lines.append(f"  {plan['step_s']:.2f} s per step; {plan['hours_to_total_steps']:,.1f} hours to total_steps")
    return "\n".join(lines)


def preset_of_spec(spec: str, preset: str | None):
    """The Preset of an `adm sample --model/--classifier` value without loading weights where possible."""
    from pathlib import Path

    from diffusion_core import presets
    from diffusion_core.presets import Preset

    if preset:
        return presets.get(preset)
    if spec.startswith("openai:"):
        from diffusion_core.openai_compat import preset_for_openai_file

        return presets.get(preset_for_openai_file(Path(spec[len("openai:"):]).name))
    path = Path(spec)
    if path.is_dir():
        from launch.train.checkpointing import read_run_config

        return Preset.from_dict(read_run_config(path)["preset"])
    if not path.exists():
        raise FileNotFoundError(f"{spec} is neither a model file, a run directory nor 'openai:FILE' (no such path)")
    from launch.model_io import load_model_file

    return Preset.from_dict(load_model_file(path)[1])


def world_size_from_env() -> int:
    """WORLD_SIZE (torchrun) or SLURM_NTASKS, else 1: the default --world-size of a dry run."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


__all__ = ["LiveBytes", "preset_of_spec", "training_plan", "training_memory", "sampling_plan", "sampling_steps",
           "format_plan",
           "trace_training_step", "trace_sampling_step", "world_size_from_env"]
