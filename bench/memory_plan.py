"""The dry-run memory plan against the measured peak of a real training run on this machine.

Runs the real trainer (shards, a loader worker, EMA, the chosen strategy and precision) for a few
steps on the CPU and measures its peak memory two ways, then prints the plan's estimate
(`launch.plan.training_memory`, fake tensors, nothing allocated) and the ratios:

- torch storages: `launch.plan.LiveBytes` over the real tensors, active from before the model is
  built (weights, optimizer state, EMA, DDP buckets, DeepSpeed's buffers, activations, gradients:
  everything torch allocates through its dispatcher in this process);
- resident set: the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS
  before the model was built. Run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back
  to the kernel at once; RSS still counts non-tensor memory (Python objects, libraries' buffers).

    python bench/memory_plan.py --preset adm64 --set model.image_size=32 model.model_channels=64 ...
    torchrun --nproc_per_node 2 bench/memory_plan.py --strategy fsdp --data SHARDS --work DIR

Prints one JSON object (rank 0); --out writes it too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REDUCED_ADM64 = ["model.image_size=32", "model.model_channels=64", "model.num_res_blocks=1", "model.dropout=0.1"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(args) -> dict:
    import torch

    from runtime import distributed
    from launch.plan import LiveBytes, training_memory
    from launch.train import loop
    from launch.train.config import build_config, resolve
    from launch.train.diffusion import DiffusionObjective
    import torch.utils.tensorboard  # noqa: F401 - imported before the baseline: not the run's memory

    info = distributed.setup()
    world = info.world_size
    sets = [f"total_steps={args.steps}", f"batch_size={args.micro_batch * world}", f"log_every={args.steps}",
            f"save_every={10 ** 6}", f"num_workers={args.workers}", "progress=false", "allow_slow_precision=true",
            *args.set]
    cfg = build_config("diffusion", sets=sets, preset=args.preset, data=args.data, strategy=args.strategy,
                       precision=args.precision)
    cfg, preset = resolve(cfg)
    estimate = training_memory(cfg, preset, world)
    launch_id = os.environ.get("MASTER_PORT", "") if world > 1 else str(os.getpid())
    run_dir = Path(args.work) / f"run-{args.strategy}-{launch_id}"
    torch.set_num_threads(1)
    rss_before = _status_kib("VmRSS")
    rss_reset = reset_peak_rss()
    with LiveBytes() as live:
        trainer = loop.Trainer(cfg, preset, run_dir, DiffusionObjective, info)
        trainer.fit()
    rss_peak = _status_kib("VmHWM")
    total = sum(estimate.values())
    return {
        "preset": preset.name, "overrides": args.set, "strategy": args.strategy, "precision": args.precision,
        "world_size": world, "micro_batch": args.micro_batch,
        "parameters": sum(p.numel() for p in trainer.strategy.module.parameters()),
        "estimate_bytes": estimate, "estimate_total_bytes": total,
        "measured_torch_peak_bytes": live.peak,
        "measured_rss_peak_delta_bytes": (rss_peak - rss_before) * 1024 if rss_reset else None,
        "estimate_over_torch_peak": total / live.peak,
        "estimate_over_rss_delta": total / ((rss_peak - rss_before) * 1024) if rss_reset else None,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="adm64")
    parser.add_argument("--set", nargs="*", default=None, help="config KEY=VALUE items (default: a reduced ADM-64)")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--data", default=None, help="training shards (default: digit shards made in --work)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.set is None:
        args.set = REDUCED_ADM64 if args.preset == "adm64" else []
    args.work = args.work or tempfile.mkdtemp(prefix="adm-memory-plan-")
    if args.data is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("several processes: make the shards first and pass --data")
        from bench.host_syncs import digit_shards

        args.data = str(digit_shards(Path(args.work), 32))
    from bench.host_syncs import report_on_rank0

    return report_on_rank0(measure, args)


if __name__ == "__main__":
    sys.exit(main())
