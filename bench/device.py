"""Every GPU benchmark of the project in one run on one GPU (< 8 minutes), written to one JSON file.

Called by bench/device.sh. Sections, each timed with CUDA events around synchronised blocks:

- env:     GPU, its datasheet peaks, the measured bf16 and TF32 matmul peaks;
- train:   ADM-64 and ADM-256 training steps in bf16 through the real trainer (digit shards, loader
           workers, AdamW, EMA): images/s, MFU, peak memory against the dry-run plan's estimate,
           and the host syncs of the steady-state steps (counted, and run under
           torch.cuda.set_sync_debug_mode("error"));
- sample:  guided ADM-256 sampling (ADM-256 + its classifier, random weights, bf16): one DDPM step
           and a 20-step DPM-Solver++ run, samples/s and MFU, and the host syncs of a DDPM step;
- eval:    the FID Inception's feature throughput and precision/recall at the paper's 10k x 50k.

    bash bench/device.sh [OUT.json]          # on a GPU machine
    python bench/device.py --cpu --out x.json  # smoke run of the same code on tiny sizes (no GPU)

A section that fails records its error and the others still run; a section that would overrun
the time budget is skipped and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GPU = {"train": [("adm64", 64), ("adm256", 16)], "sample": ("adm256", "adm256-classifier", 32),
       "warmup": 5, "steps": 15, "sync_steps": 3, "inception": (250, 8, 256), "pr": (10_000, 50_000)}
CPU = {"train": [("tiny-unet", 4)], "sample": ("tiny-unet", "tiny-classifier", 4),
       "warmup": 2, "steps": 2, "sync_steps": 2, "inception": (2, 1, 64), "pr": (200, 1000)}


class Clock:
    """Seconds of device work in a block (CUDA events; perf_counter on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def env_section(device, sizes) -> dict:
    from launch.train import perf

    out = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = perf.gpu_peaks(name)
        out.update(name=name, table=dataclasses.asdict(peaks) if peaks else None,
                   memory_gib=torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
        torch.backends.cuda.matmul.allow_tf32 = True
        out["measured_tflops"] = {"bf16": perf.measured_matmul_peak(device, torch.bfloat16) / 1e12,
                                  "tf32": perf.measured_matmul_peak(device, torch.float32) / 1e12}
    else:
        out["measured_tflops"] = {"fp32": perf.measured_matmul_peak(device, torch.float32) / 1e12}
    return out


def _shards(work: Path, size: int) -> Path:
    from bench.host_syncs import digit_shards

    return digit_shards(work, size)


def _trainer(preset_name: str, micro: int, precision: str, work: Path, workers: int, extra: list[str]):
    from runtime import distributed
    from launch.train import loop
    from launch.train.config import build_config, resolve
    from launch.train.diffusion import DiffusionObjective
    from diffusion_core import presets

    size = presets.get(preset_name).model.image_size
    sets = [f"batch_size={micro}", "total_steps=1000000", "log_every=1000000", "save_every=1000000",
            f"num_workers={workers}", "progress=false", "allow_slow_precision=true", *extra]
    cfg, preset = resolve(build_config("diffusion", sets=sets, preset=preset_name, data=str(_shards(work, size)),
                                       strategy="ddp", precision=precision))
    info = distributed.setup()
    return loop.Trainer(cfg, preset, work / f"run-{preset_name}-{time.time_ns()}", DiffusionObjective, info), cfg, preset


def _count_syncs(fn, steps: int, device) -> dict:
    """Host syncs of `steps` calls of fn: dispatched ones counted, and on a GPU under sync debug "error"."""
    from runtime.host_sync import HostSyncCounter, cuda_sync_debug

    with HostSyncCounter() as counter:
        for _ in range(steps):
            fn()
    out = {"steps": steps, "counted": counter.count(), "where": counter.by_location()}
    if device.type == "cuda":
        try:
            with cuda_sync_debug("error"):
                for _ in range(steps):
                    fn()
            out["sync_debug_error_mode"] = "passed"
        except RuntimeError as err:
            out["sync_debug_error_mode"] = f"failed: {str(err).splitlines()[0][:300]}"
            out["sync_debug_traceback"] = traceback.format_exc(limit=8)[-2000:]
    return out


def train_section(device, sizes, work: Path, workers: int, compile_model: bool) -> dict:
    from launch.plan import training_memory
    from launch.train import perf

    results = {}
    for name, micro in sizes["train"]:
        precision = "bf16" if device.type == "cuda" else "fp32"
        trainer, cfg, preset = _trainer(name, micro, precision, work, workers, ["compile=true"] if compile_model else [])
        flops = perf.flops_per_image(preset)
        peak, source = perf.peak_flops(device, precision)
        estimate = sum(training_memory(cfg, preset, 1).values())
        for _ in range(sizes["warmup"]):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Clock(device) as clock:
            for _ in range(sizes["steps"]):
                trainer.train_step()
        rate = sizes["steps"] * micro / clock.seconds
        measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        results[name] = {
            "precision": precision, "micro_batch": micro, "steps_timed": sizes["steps"],
            "images_per_s": rate, "step_s": clock.seconds / sizes["steps"], "gflop_per_image": flops / 1e9,
            "mfu": rate * flops / peak, "peak_tflops": peak / 1e12, "peak_source": source,
            "plan_estimate_gib": estimate / 2 ** 30,
            "measured_peak_gib": measured / 2 ** 30 if measured is not None else None,
            "estimate_over_measured": estimate / measured if measured else None,
            "host_syncs": _count_syncs(trainer.train_step, sizes["sync_steps"], device),
        }
        trainer.logger.close()
        trainer.signals.uninstall()
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _guided(model_name: str, clf_name: str, device, precision: str):
    from diffusion_core import presets
    from diffusion_core.guidance import guided_sampling
    from launch.precision import autocast

    model_preset, clf_preset = presets.get(model_name), presets.get(clf_name)
    with torch.device(device):
        model = model_preset.build().eval().requires_grad_(False)
        clf = clf_preset.build().eval().requires_grad_(False)

    def model_fn(x, t, **kw):
        with autocast(precision, device):
            return model(x, t, **kw).float()

    def clf_fn(x, t, **kw):
        with autocast(precision, device):
            return clf(x, t).float()

    model_fn_g, cond_fn = guided_sampling(model_fn, clf_fn, classifier_scale=1.0)
    return model_preset, clf_preset, model_fn_g, cond_fn


def sample_section(device, sizes) -> dict:
    from launch.plan import _forward_flops
    from launch.train import perf

    model_name, clf_name, batch = sizes["sample"]
    precision = "bf16" if device.type == "cuda" else "fp32"
    model_preset, clf_preset, model_fn, cond_fn = _guided(model_name, clf_name, device, precision)
    peak, source = perf.peak_flops(device, precision)
    step_flops = _forward_flops(model_preset, False) + _forward_flops(clf_preset, True)
    cfg = model_preset.model
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_classes or 1, (batch,), device=device)
    out = {"model": model_name, "classifier": clf_name, "precision": precision, "batch": batch,
           "gflop_per_step_per_sample": step_flops / 1e9, "peak_tflops": peak / 1e12, "peak_source": source}
    ddpm = dataclasses.replace(model_preset.diffusion, timestep_respacing="250").build()
    x = torch.randn(shape, device=device)
    noise = torch.randn(shape, device=device)

    def ddpm_step():
        t = torch.full((batch,), 125, dtype=torch.long, device=device)
        with torch.no_grad():
            return ddpm.p_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs={"y": y}, noise=noise)

    for _ in range(2):
        ddpm_step()
    with Clock(device) as clock:
        for _ in range(sizes["steps"]):
            ddpm_step()
    per_step = clock.seconds / sizes["steps"]
    out["ddpm"] = {"step_s": per_step, "mfu": batch * step_flops / per_step / peak,
                   "samples_per_s_at_250_steps": batch / (250 * per_step),
                   "host_syncs": _count_syncs(ddpm_step, sizes["sync_steps"], device)}
    unspaced = dataclasses.replace(model_preset.diffusion, timestep_respacing="").build()
    dpm_steps = 20 if device.type == "cuda" else 3

    def dpm_run():
        with torch.no_grad():
            return unspaced.dpm_solver_sample_loop(model_fn, shape, noise=x, cond_fn=cond_fn, model_kwargs={"y": y},
                                                   device=device, steps=dpm_steps, order=2)

    dpm_run()
    with Clock(device) as clock:
        dpm_run()
    out["dpm_solver++"] = {"steps": dpm_steps, "run_s": clock.seconds, "samples_per_s": batch / clock.seconds,
                           "mfu": batch * step_flops * dpm_steps / clock.seconds / peak,
                           "vs_ddpm_250_samples_per_s": (batch / clock.seconds) / (batch / (250 * per_step))}
    return out


def eval_section(device, sizes) -> dict:
    from evaluation.evaluate import no_tf32
    from evaluation.inception import FIDInception
    from evaluation.metrics import precision_recall

    batch, batches, size = sizes["inception"]
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    with no_tf32(), torch.no_grad():
        net = FIDInception().to(device)
        net(x)
        with Clock(device) as clock:
            for _ in range(batches):
                net(x)
    n_ref, n_sam = sizes["pr"]
    ref = torch.rand(n_ref, 2048, device=device)
    sam = torch.rand(n_sam, 2048, device=device) * 1.05
    with Clock(device) as pr_clock:
        pr = precision_recall(ref, sam, fp16=True)
    return {"inception": {"input_px": size, "batch": batch, "images_per_s": batch * batches / clock.seconds,
                          "minutes_for_60k": 60_000 / (batch * batches / clock.seconds) / 60},
            "precision_recall": {"ref": n_ref, "samples": n_sam, "seconds": pr_clock.seconds,
                                 "precision": float(pr[0]), "recall": float(pr[1])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-device.json", help="the JSON report")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU with tiny sizes")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would start after this")
    parser.add_argument("--only", nargs="*", choices=["env", "train", "sample", "eval"], default=None)
    parser.add_argument("--workers", type=int, default=6, help="loader workers of the training runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training models (cold compile counts)")
    parser.add_argument("--work", default=None, help="folder for shards and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench/device.py: error: no CUDA device visible; run on a GPU machine or pass --cpu", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    sizes = CPU if args.cpu else GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="adm-bench-device-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-smoke" if args.cpu else "gpu", "sections": {}}
    sections = {"env": lambda: env_section(device, sizes),
                "train": lambda: train_section(device, sizes, work, 1 if args.cpu else args.workers, args.compile),
                "sample": lambda: sample_section(device, sizes),
                "eval": lambda: eval_section(device, sizes)}
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget: {elapsed:.0f} s used of {args.budget_s:.0f}"}
            continue
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as err:  # one broken benchmark must not lose the others' numbers
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=10)[-3000:]}
        result["section_s"] = time.perf_counter() - t0
        report["sections"][name] = result
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: " + json.dumps(result, default=str)[:400], flush=True)
    report["total_s"] = time.perf_counter() - start
    from runtime.files import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({report['total_s']:.0f} s)")
    from runtime import distributed

    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
