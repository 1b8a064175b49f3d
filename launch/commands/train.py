"""Train an ADM diffusion model (hybrid loss) from a preset plus overrides.

Examples:
  adm train --run-dir runs/tiny --preset tiny-unet --data shards/digits --set total_steps=200
  torchrun --nproc_per_node 8 -m launch.cli train --run-dir runs/adm64 --preset adm64 \
      --data /data/imagenet64 --precision bf16 --strategy fsdp
Rerunning the same command resumes from the run's latest complete checkpoint.
"""
from __future__ import annotations

import argparse

from launch.choices import PRECISIONS, STRATEGIES

# The trainer polls runtime.preemption at its step boundaries: under SLURM a signal that comes while it
# starts up waits for its first checkpoint instead of requeueing a job that has done nothing.
POLLS_PREEMPTION = True


def add_common_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """Options shared by `adm train` and `adm train-classifier`."""
    parser.add_argument("--run-dir", required=True, help="run directory (config.json, checkpoints/, tensorboard/, log.txt); "
                        "an existing run is resumed")
    parser.add_argument("--preset", default=None, help="model preset (see diffusion_core.presets.names()); "
                        f"default {'tiny-classifier' if kind == 'classifier' else 'tiny-unet'}")
    parser.add_argument("--data", default=None, help="training shards: a folder from `adm prepare-imagenet`, a glob or a brace pattern")
    parser.add_argument("--config", default=None, help="YAML, TOML or JSON file of config keys (applied before --set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override a config key, e.g. --set lr=1e-4 model.dropout=0.1 (repeatable)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None, help="data-parallel strategy (default ddp)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="arithmetic precision (default fp32)")
    parser.add_argument("--init-from", default=None, help="start from weights: our model file, a run directory or openai:FILE")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the memory/time plan as JSON (the plan as a table on "
                             "stderr) and exit; nothing is allocated")
    plan = parser.add_argument_group("dry-run plan")
    plan.add_argument("--world-size", type=int, default=None,
                      help="GPUs the job will run on (default: $WORLD_SIZE or $SLURM_NTASKS, else 1)")
    plan.add_argument("--gpu", default=None, help="GPU model to plan for, e.g. H100, 'A100 40GB' "
                      "(default: this machine's GPU, else H200)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the speed is stated at (default 0.4)")


def run_common(args, kind: str, **extra) -> int:
    """Build the config from the arguments, then dry-run or train; 143 after a preemption checkpoint."""
    import json
    import sys

    from launch.train.config import build_config, resolve, resolved_dict
    from launch.train.loop import Preempted

    sets = [item for group in args.set for item in group]
    cfg = build_config(kind, file=args.config, sets=sets, preset=args.preset, data=args.data,
                       strategy=args.strategy, precision=args.precision, init_from=args.init_from, **extra)
    if args.dry_run:
        from launch.plan import format_plan, training_plan, world_size_from_env

        resolved, preset = resolve(cfg, require_data=False)
        world = args.world_size if args.world_size is not None else world_size_from_env()
        plan = training_plan(resolved, preset, world, gpu=args.gpu, mfu=args.mfu)
        print(format_plan(plan), file=sys.stderr)
        print(json.dumps({**resolved_dict(resolved, preset), "plan": plan}, indent=2))
        return 0
    if kind == "classifier":
        from launch.train.classifier import train_classifier as job
    else:
        from launch.train.diffusion import train as job
    try:
        job(cfg, args.run_dir)
    except Preempted as stop:
        print(f"adm {'train-classifier' if kind == 'classifier' else 'train'}: stopped early: {stop}; "
              "rerun the same command to resume", file=sys.stderr)
        return 143
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "diffusion")


def run(args) -> int:
    return run_common(args, "diffusion")
