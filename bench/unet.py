"""Benchmark of the ADM UNet: our implementation against an original-style one, same config and weights.

CPU (default): the reduced ADM-64 config (64 px, width 64, 2 res blocks, attention at 32,16,8,
32 channels per head), fp32. For a training step (forward + backward) and a sampling forward it
prints images/s, achieved TFLOP/s (FLOPs counted with FlopCounterMode) as a fraction of this
machine's fp32 matmul peak measured in the same run, and the speed ratio ours / original.

"original" = guided-diffusion's implementation choices: hand-written einsum attention (q and k
each scaled by d^-1/4, float32 softmax), attention always recomputed in backward, NCHW activations.
"ours" = F.scaled_dot_product_attention on token-major q/k/v, checkpointing only when asked,
channels-last activations on CPU. The two share one module and its weights.

Timings alternate between the implementations; the table shows the best of the repeats (other
processes only ever slow a run down) and the per-repeat ratios' median and range.

    python bench/unet.py                  # CPU, reduced ADM-64
    python bench/unet.py --gpu            # ADM-64 and ADM-256 in bf16 autocast on a CUDA device
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from diffusion_core import presets
from diffusion_core.unet import UNetConfig, build_model

# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel.
_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    ),
}


def reduced_adm64() -> UNetConfig:
    """ADM-64's architecture at width 64 (the issue's CPU benchmark config)."""
    return UNetConfig(
        image_size=64, model_channels=64, num_res_blocks=2, attention_resolutions=(32, 16, 8),
        num_head_channels=32, num_classes=1000, use_new_attention_order=True,
    )


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised tensors small random values so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def set_impl(model: torch.nn.Module, impl: str, ours_layout: str = "auto") -> None:
    """'ours' or 'original' (see the module docstring)."""
    model.set_attention_impl("sdpa" if impl == "ours" else "original")
    model.set_memory_format(ours_layout if impl == "ours" else "contiguous")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best achieved FLOP/s of an n x n torch.mm (this machine's practical matmul peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model, x, t, y, amp_dtype):
    """Closures for one training step (forward + backward) and one sampling forward."""

    def autocast():
        return torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train():
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(x, t, y)
        out.float().square().mean().backward()

    def sample():
        with torch.no_grad(), autocast():
            model(x, t, y)

    return {"train": train, "sample": sample}


def count_flops(steps: dict[str, Callable[[], None]]) -> dict[str, int]:
    """FLOPs of each step with our implementation (no recomputation)."""
    flops = {}
    for name, fn in steps.items():
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    return flops


def time_alternating(model, steps, impls, repeats: int, device: torch.device) -> dict[tuple[str, str], list[float]]:
    """Per-repeat seconds of each (impl, step); the order of impls alternates between repeats."""
    times: dict[tuple[str, str], list[float]] = {(i, s): [] for i in impls for s in steps}
    for impl in impls:  # warm-up (allocator, oneDNN primitive caches, cuDNN autotuning)
        set_impl(model, impl[0], impl[1])
        for fn in steps.values():
            fn()
    for r in range(repeats):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            set_impl(model, impl[0], impl[1])
            for name, fn in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[(impl, name)].append(time.perf_counter() - t0)
    return times


def run_case(label, cfg, batch, device, amp_dtype, peak, repeats, ours_layouts=("auto",)) -> None:
    """Build `cfg`, check the implementations agree, time them and print the table."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    randomise(model)
    model.train()
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device) if cfg.num_classes else None
    steps = make_steps(model, x, t, y, amp_dtype)

    with torch.no_grad():
        set_impl(model, "original")
        ref = model(x, t, y)
        set_impl(model, "ours", ours_layouts[0])
        diff = (model(x, t, y) - ref).abs().max().item() / ref.abs().max().item()
    set_impl(model, "ours", ours_layouts[0])
    flops = count_flops(steps)
    impls = [("ours", layout) for layout in ours_layouts] + [("original", "contiguous")]
    times = time_alternating(model, steps, impls, repeats, device)
    peak = max(peak, matmul_peak(device, torch.float32 if amp_dtype is None else amp_dtype, peak_size(device)))

    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {label}: {params / 1e6:.1f}M params, batch {batch}, "
          f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1] + ' autocast'}, {device} ==")
    print(f"ours vs original forward: max |diff| / max |out| = {diff:.1e}")
    print(f"matmul peak (best {peak_size(device)}^2 torch.mm, before and after): {peak / 1e12:.3f} TFLOP/s")
    print(f"{'step':<8}{'implementation':<28}{'s/iter':>9}{'img/s':>9}{'TFLOP/s':>9}{'of peak':>9}")
    best = {key: min(values) for key, values in times.items()}  # best-of-N resists other processes' noise
    for name in steps:
        for impl in impls:
            sec = best[(impl, name)]
            rate = flops[name] / sec
            tag = impl[0] if impl[0] == "original" else f"ours ({impl[1]})"
            print(f"{name:<8}{tag:<28}{sec:>9.3f}{batch / sec:>9.1f}{rate / 1e12:>9.3f}{rate / peak:>9.1%}")
    for impl in impls[:-1]:
        for name in steps:
            ratios = [o / s for s, o in zip(times[(impl, name)], times[(impls[-1], name)])]
            print(f"speed ratio ours ({impl[1]}) / original, {name}: {best[(impls[-1], name)] / best[(impl, name)]:.2f}x "
                  f"best-of-{len(ratios)}; per-repeat median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="ADM-64 and ADM-256 in bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="images per step (CPU default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        peak = matmul_peak(device, torch.bfloat16, peak_size(device))
        for name, batch in (("adm64", args.batch or 64), ("adm256", args.batch or 8)):
            cfg = presets.get(name).model
            run_case(name, cfg, batch, device, torch.bfloat16, peak, args.repeats,
                     ours_layouts=("contiguous", "channels_last"))
        return 0
    device = torch.device("cpu")
    # Other processes on a shared machine distort absolute numbers (ratios less so): show the load.
    load = os.getloadavg()[0]
    print(f"CPU threads: {torch.get_num_threads()}, load average: {load:.1f} on {os.cpu_count()} CPUs")
    if torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        print("warning: the CPUs are oversubscribed; multi-threaded timings will be erratic (try --threads 1)")
    peak = matmul_peak(device, torch.float32, peak_size(device))
    run_case("reduced ADM-64", reduced_adm64(), args.batch or 4, device, None, peak, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
