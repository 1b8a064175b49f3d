"""Guided sampling throughput (samples/s) and model FLOP utilisation of the sampler's own step.

    .venv/bin/python bench/sample.py                      # CPU, tiny models, fp32
    .venv/bin/python bench/sample.py --gpu                # ADM-64 and ADM-256 + classifiers, bf16

Times `launch.sample.sampler.GuidedSampler.sample` (the job's inner loop: per-sample CPU noise with
prefetch, guided model call, classifier gradient, diffusion step) on randomly initialised networks,
for guided 250-step DDPM and guided DDIM-25. A DDPM step and a DDIM step cost the same network
work, so the 250-step figure is extrapolated from `--measure-steps` timed steps (printed as such).
FLOPs per sample-step are counted once with torch's FlopCounterMode (model forward, classifier
forward and its input-gradient backward); MFU = counted FLOP/s / peak, where the peak is a measured
fp32 matmul on CPU and the datasheet dense bf16 peak on a GPU (--peak-tflops to override).
Printed ratios: DDIM-25 vs DDPM-250 samples/s, guided vs unguided step time, and with
--network-batch C the guided step time of the batch run as chunks of C rows over one call of the
whole batch (the price of the sampler's batch-size-independent mode).

Guided-step cost per sampler (DDPM-250, DDIM-25, DPM-Solver++(2M) with 15 and 20 evaluations):
network evaluations per sample, counted from the rows the model and the classifier actually
receive during the timed loops (a classifier evaluation is a forward and the backward to its
input), and seconds per sample, each also as a ratio to DDPM-250 in the same run. DDPM-250's
figures are extrapolated from its `--measure-steps` timed steps (printed as such).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_core import presets  # noqa: E402
from launch.choices import COMPILE_MODES  # noqa: E402
from launch.sample.guided import GuidedSampler  # noqa: E402
from launch.sample.options import sample_seed  # noqa: E402

GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def cpu_peak_flops(n: int = 1024, repeat: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this process's threads (the CPU 'peak' for MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0)


def gpu_peak_flops(override: float | None) -> float:
    if override:
        return override * 1e12
    name = torch.cuda.get_device_name()
    for key, value in GPU_PEAK_BF16.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 peak)")


class RowCounter(torch.nn.Module):
    """A network that counts the rows (sample evaluations) it is called with."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, *args, **kwargs):
        self.rows += x.shape[0]
        return self.net(x, *args, **kwargs)


def build_networks(model_name: str, clf_name: str | None, device, compile_mode: str):
    """Randomly initialised model and classifier, built directly on `device` (optionally compiled),
    each wrapped in a RowCounter."""
    with torch.device(device):
        model = presets.build(model_name).eval().requires_grad_(False)
        clf = presets.build(clf_name).eval().requires_grad_(False) if clf_name else None
    if compile_mode != "none":
        mode = None if compile_mode == "default" else compile_mode
        model = torch.compile(model, mode=mode)
        clf = torch.compile(clf, mode=mode) if clf is not None else None
    return RowCounter(model), (RowCounter(clf) if clf is not None else None)


def make_sampler(model_name: str, networks, steps: str, device, precision: str, guided: bool = True,
                 network_batch: int | None = None) -> GuidedSampler:
    """The job's GuidedSampler over shared networks; `guided=False` leaves the classifier out."""
    model, clf = networks
    sampler = GuidedSampler(model, presets.get(model_name), steps=steps, classifier=clf if guided else None,
                            precision=precision, device=device, network_batch=network_batch)
    sampler.networks = (model, clf if guided else None)  # for step_flops
    return sampler


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_flops(sampler: GuidedSampler, batch: int, num_classes: int) -> float:
    """FLOPs of one guided step for `batch` samples: model forward, classifier forward and the
    backward to its input, counted by running them (FlopCounterMode cannot see inside
    autograd.grad, so the classifier part is replayed with .backward())."""
    device = sampler.device
    model, clf = sampler.networks
    x = torch.randn(batch, *sampler.image_shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    t = torch.full((batch,), 500, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, t, y=y)
        if clf is not None:
            x_in = x.clone().requires_grad_(True)
            logits = clf(x_in, t).float().log_softmax(-1)
            logits[torch.arange(batch, device=device), y].sum().backward()
    return float(counter.get_total_flops())


def seconds_per_step(sampler: GuidedSampler, batch: int, num_classes: int, warmup: int = 2,
                     on_start=None) -> float:
    """Wall seconds per reverse step of `sampler.sample` (the whole loop, noise included);
    `on_start()` is called after the warm-up steps, just before the timed loop."""
    seeds = [sample_seed(0, i) for i in range(batch)]
    y = torch.randint(0, num_classes, (batch,), device=sampler.device)
    x = torch.randn(batch, *sampler.image_shape, device=sampler.device)
    for _ in range(warmup):  # allocator, cuDNN autotuning, compilation
        sampler.step(x, sampler.num_steps - 1, sampler.model_kwargs(y, None), torch.randn_like(x))
    _sync(sampler.device)
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    sampler.sample(seeds, y)
    _sync(sampler.device)
    return (time.perf_counter() - t0) / sampler.num_steps


# (label, steps string, steps the cost is quoted for): the samplers of the cost table.
COST_SAMPLERS = (("DDPM-250", None, 250), ("DDIM-25", "ddim25", 25), ("DPM-Solver++(2M)-15", "dpm++2m-15", 15),
                 ("DPM-Solver++(2M)-20", "dpm++2m-20", 20))


def sampler_costs(model_name: str, nets, batch: int, device, precision: str, measure_steps: int,
                  repeats: int = 3) -> list[dict]:
    """Per sampler: model and classifier evaluations per sample (counted) and seconds per sample,
    with ratios to DDPM-250 (whose loop is timed for `measure_steps` steps and scaled to 250). Each
    loop is timed `repeats` times, round-robin over the samplers, and the fastest time counts: on a
    shared machine the slow outliers are other processes, not the sampler."""
    num_classes = presets.get(model_name).model.num_classes
    model, clf = nets

    def reset():
        model.rows = clf.rows = 0

    samplers = [make_sampler(model_name, nets, steps or str(measure_steps), device, precision)
                for _, steps, _ in COST_SAMPLERS]
    best = [math.inf] * len(samplers)
    counted = [(0, 0)] * len(samplers)
    for _ in range(repeats):
        for k, sampler in enumerate(samplers):
            best[k] = min(best[k], seconds_per_step(sampler, batch, num_classes, warmup=1, on_start=reset))
            counted[k] = (model.rows, clf.rows)
    rows = []
    for (label, steps, quoted), sampler, per_step, (model_rows, clf_rows) in zip(COST_SAMPLERS, samplers, best, counted):
        scale = quoted / sampler.num_steps
        rows.append({"sampler": label, "steps": steps or "250", "extrapolated": steps is None,
                     "model_evals_per_sample": model_rows / batch * scale,
                     "classifier_evals_per_sample": clf_rows / batch * scale,
                     "seconds_per_sample": per_step * quoted / batch})
    base = rows[0]
    for r in rows:
        r["evals_ratio"] = r["model_evals_per_sample"] / base["model_evals_per_sample"]
        r["seconds_ratio"] = r["seconds_per_sample"] / base["seconds_per_sample"]
    print(f"  guided-step cost per sampler (batch {batch}; ratios to DDPM-250 in this run):\n"
          f"    {'sampler':<22}{'model evals':>12}{'clf evals':>10}{'s/sample':>10}{'evals ratio':>13}{'time ratio':>11}")
    for r in rows:
        note = f"  (extrapolated from {measure_steps} steps)" if r["extrapolated"] else ""
        print(f"    {r['sampler']:<22}{r['model_evals_per_sample']:>12.0f}{r['classifier_evals_per_sample']:>10.0f}"
              f"{r['seconds_per_sample']:>10.4f}{r['evals_ratio']:>13.3f}{r['seconds_ratio']:>11.3f}{note}", flush=True)
    return rows


def run_config(label: str, model_name: str, clf_name: str, batch: int, device, precision: str, peak: float,
               measure_steps: int, compile_mode: str, network_batch: int | None = None, repeats: int = 3) -> dict:
    num_classes = presets.get(model_name).model.num_classes
    nets = build_networks(model_name, clf_name, device, compile_mode)
    guided_ddpm = make_sampler(model_name, nets, str(measure_steps), device, precision)
    guided_ddim = make_sampler(model_name, nets, "ddim25", device, precision)
    flops = step_flops(guided_ddpm, batch, num_classes)
    t_ddpm = seconds_per_step(guided_ddpm, batch, num_classes)
    t_ddim = seconds_per_step(guided_ddim, batch, num_classes)
    unguided = make_sampler(model_name, nets, str(measure_steps), device, precision, guided=False)
    t_plain = seconds_per_step(unguided, batch, num_classes)
    t_chunked = None
    if network_batch:
        chunked = make_sampler(model_name, nets, str(measure_steps), device, precision, network_batch=network_batch)
        t_chunked = seconds_per_step(chunked, batch, num_classes)
    res = {
        "label": label, "batch": batch, "precision": precision, "compile": compile_mode,
        "gflop_per_sample_step": flops / batch / 1e9,
        "ddpm250_samples_per_s": batch / (t_ddpm * 250), "ddim25_samples_per_s": batch / (t_ddim * 25),
        "mfu_ddpm": flops / t_ddpm / peak, "mfu_ddim": flops / t_ddim / peak,
        "guided_over_unguided_step_time": t_ddpm / t_plain, "measure_steps": measure_steps,
        "network_batch": network_batch, "chunked_over_whole_step_time": t_chunked and t_chunked / t_ddpm,
    }
    print(f"{label}: batch {batch}, {precision}, compile={compile_mode}: "
          f"{res['gflop_per_sample_step']:.2f} GFLOP per sample-step (guided)\n"
          f"  guided DDPM-250: {res['ddpm250_samples_per_s']:.3f} samples/s (extrapolated from {measure_steps} steps), "
          f"MFU {100 * res['mfu_ddpm']:.1f}%\n"
          f"  guided DDIM-25 : {res['ddim25_samples_per_s']:.3f} samples/s, MFU {100 * res['mfu_ddim']:.1f}%\n"
          f"  ratios: DDIM-25 / DDPM-250 samples/s = {res['ddim25_samples_per_s'] / res['ddpm250_samples_per_s']:.2f}; "
          f"guided / unguided step time = {res['guided_over_unguided_step_time']:.2f}"
          + (f"; network batch {network_batch} / whole batch step time = {res['chunked_over_whole_step_time']:.2f}"
             if network_batch else ""), flush=True)
    res["sampler_costs"] = sampler_costs(model_name, nets, batch, device, precision, measure_steps, repeats)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="ADM-64 and ADM-256 with their classifiers on CUDA")
    parser.add_argument("--configs", default="adm64,adm256", help="with --gpu: which of adm64, adm128, adm256, adm512")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
    parser.add_argument("--precision", default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--measure-steps", type=int, default=None, help="timed DDPM steps (default 50 CPU, 10 GPU)")
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense peak for MFU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per sampler in the cost table, the fastest counts (default 3)")
    parser.add_argument("--network-batch", type=int, default=None,
                        help="also time the guided step run in chunks of this many rows (adm sample --network-batch)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        peak = gpu_peak_flops(args.peak_tflops)
        precision = args.precision or "bf16"
        print(f"{torch.cuda.get_device_name()}: peak {peak / 1e12:.0f} TFLOP/s (dense bf16), torch {torch.__version__}")
        for name in args.configs.split(","):
            batch = args.batch_size or 64
            try:
                run_config(name.upper(), name, f"{name}-classifier", batch, "cuda", precision, peak,
                           args.measure_steps or 10, args.compile, args.network_batch, args.repeats)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{name}: batch {batch} does not fit; retrying with {batch // 2}")
                run_config(name.upper(), name, f"{name}-classifier", batch // 2, "cuda", precision, peak,
                           args.measure_steps or 10, args.compile, args.network_batch, args.repeats)
            torch.cuda.empty_cache()
        return 0
    peak = cpu_peak_flops()
    print(f"CPU: {torch.get_num_threads()} threads, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, torch {torch.__version__}")
    run_config("tiny (16px, CPU)", "tiny-unet", "tiny-classifier", args.batch_size or 16, "cpu",
               args.precision or "fp32", peak, args.measure_steps or 50, args.compile, args.network_batch,
               args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
