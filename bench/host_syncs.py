"""Host synchronisations per steady-state training step, through the real trainer.

Runs `adm train`'s Trainer (real shards, loader workers, the chosen strategy and precision) for
W warm-up steps, then 2N steps, then one final step (which logs and saves), and counts every
operation that makes the host wait for the device (`runtime.host_sync.HostSyncCounter`: `.item()`,
`int(t)`, `bool(t)`, `nonzero`, boolean masks, copies to the CPU), tagged with the step it happened
in. The steady state is steps [W, W + 2N): a step that is sync-free gives the same count, 0, over
the first N and over all 2N. On a GPU, `--sync-debug error` also runs those steps under
`torch.cuda.set_sync_debug_mode("error")`, which fails on any sync, dispatched or not.

    python bench/host_syncs.py --strategy ddp --precision fp32 --out syncs.json
    torchrun --nproc_per_node 2 bench/host_syncs.py --strategy fsdp --out syncs.json
    python bench/host_syncs.py --preset adm64 --precision bf16 --sync-debug error   # on a GPU

The preemption poll is replaced by the local flag (`--preemption-poll local`, the default): it
is being changed to a flag agreed every N steps (issue 12); `--preemption-poll real` counts it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def digit_shards(folder: Path, size: int) -> Path:
    """Real shards of scikit-learn's 8x8 digits upscaled to `size` (made once per folder)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from data.prepare import prepare_imagenet

    out = folder / f"digits{size}"
    if (out / "manifest.json").is_file():
        return out
    digits = load_digits()
    src = folder / f"digits{size}-src"
    for c in range(10):
        target = src / f"digit_{c}"
        target.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == c)[:12]:
            grey = (digits.images[i] * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
            Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB").save(target / f"{c}_{i:04d}.png")
    prepare_imagenet(src, out, samples_per_shard=16, allow_custom_classes=True)
    return out


def count_training(args) -> dict:
    """Run the trainer and count syncs per step range; returns the report (on every rank)."""
    import torch

    from runtime import distributed, preemption
    from runtime.host_sync import HostSyncCounter, cuda_sync_debug
    from launch.train import loop
    from launch.train.config import build_config, resolve
    from launch.train.classifier import ClassifierObjective
    from launch.train.diffusion import DiffusionObjective

    info = distributed.setup()
    work = Path(args.work)
    if not args.data and info.world_size > 1:
        raise SystemExit("several processes: make the shards first and pass --data (ranks would race to write them)")
    data = Path(args.data) if args.data else digit_shards(work, 20)
    warm, n = args.warmup, args.steps
    total = warm + 2 * n + 1
    sets = [f"total_steps={total}", f"batch_size={args.micro_batch * info.world_size}", f"log_every={10 ** 6}",
            f"save_every={10 ** 6}", f"num_workers={args.workers}", "allow_slow_precision=true", "progress=false",
            "ema_rates=0.9999", *args.set]
    if args.kind == "diffusion":
        sets.append(f"timestep_sampler={args.timestep_sampler}")
    preset_name = args.preset or ("tiny-unet" if args.kind == "diffusion" else "tiny-classifier")
    cfg = build_config(args.kind, sets=sets, preset=preset_name, data=str(data), strategy=args.strategy,
                       precision=args.precision)
    cfg, preset = resolve(cfg)
    if args.preemption_poll == "local":
        loop.preemption.requested_everywhere = preemption.requested  # issue 12 replaces the per-step poll
    launch_id = os.environ.get("MASTER_PORT", "") if info.world_size > 1 else str(os.getpid())
    run_dir = work / f"run-{args.strategy}-{args.precision}-{launch_id}"  # shared by the ranks of one launch
    objective = DiffusionObjective if args.kind == "diffusion" else ClassifierObjective
    trainer = loop.Trainer(cfg, preset, run_dir, objective, info)
    counter = HostSyncCounter(tag=lambda: trainer.step)
    step_fn = trainer.train_step
    debug = {"entered": None}

    def train_step():
        # Sync debug mode over the steady-state steps only (start-up and the final log/save sync).
        if args.sync_debug and trainer.step == warm:
            debug["entered"] = cuda_sync_debug(args.sync_debug)
            debug["entered"].__enter__()
        if args.sync_debug and trainer.step == warm + 2 * n and debug["entered"] is not None:
            debug["entered"].__exit__(None, None, None)
            debug["entered"] = None
        applied = step_fn()
        if args.inject_sync:
            float(trainer.window.sums[0, 0])  # one deliberate .item() per step: the counter must see it
        return applied

    trainer.train_step = train_step
    with counter:
        trainer.fit()
    first = lambda tag: warm <= tag < warm + n  # noqa: E731
    both = lambda tag: warm <= tag < warm + 2 * n  # noqa: E731
    return {
        "kind": args.kind, "strategy": args.strategy, "precision": args.precision, "preset": preset.name,
        "world_size": info.world_size, "device": str(info.device), "warmup_steps": warm, "N": n,
        "syncs_first_N_steps": counter.count(first), "syncs_2N_steps": counter.count(both),
        "syncs_per_step": (counter.count(both) - counter.count(first)) / n,
        "steady_state_locations": counter.by_location(both),
        "startup_and_final_step_syncs": counter.count(lambda tag: not both(tag)),
        "sync_debug": args.sync_debug or None,
        "preemption_poll": args.preemption_poll,
        "timestep_sampler": args.timestep_sampler,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--kind", choices=["diffusion", "classifier"], default="diffusion", help="adm train or train-classifier")
    parser.add_argument("--preset", default=None, help="default tiny-unet / tiny-classifier")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="steps before counting")
    parser.add_argument("--steps", type=int, default=3, help="N: counts are compared over N and 2N steps")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--timestep-sampler", default="uniform")
    parser.add_argument("--set", nargs="*", default=[], help="extra training config KEY=VALUE items")
    parser.add_argument("--data", default=None, help="training shards (default: digit shards in --work)")
    parser.add_argument("--work", default=None, help="folder for shards and the run (default: a temporary one)")
    parser.add_argument("--sync-debug", choices=["warn", "error"], default=None,
                        help="CUDA: run the steady-state steps under torch.cuda.set_sync_debug_mode")
    parser.add_argument("--preemption-poll", choices=["local", "real"], default="local")
    parser.add_argument("--inject-sync", action="store_true", help="add one .item() per step (checks the counter)")
    parser.add_argument("--out", default=None, help="JSON report (written by rank 0)")
    args = parser.parse_args(argv)
    args.work = args.work or tempfile.mkdtemp(prefix="adm-host-syncs-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return report_on_rank0(count_training, args)


def report_on_rank0(measure, args) -> int:
    """`measure(args)` on every rank; rank 0 prints the JSON report and writes it to `args.out` (atomically).
    The process group goes down afterwards, also on an error."""
    from runtime import distributed

    try:
        report = measure(args)
        if int(os.environ.get("RANK", "0")) == 0:
            text = json.dumps(report, indent=2)
            print(text)
            if args.out:
                from runtime.files import atomic_write_text

                atomic_write_text(Path(args.out), text + "\n")
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
