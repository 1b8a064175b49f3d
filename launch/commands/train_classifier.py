"""Train the noisy classifier used for classifier guidance.

Inputs are noised at uniform t with the preset's diffusion schedule (random crop + flip first);
AdamW with linear decay to zero; top-1/top-5 accuracy overall and per timestep quartile.

Examples:
  adm train-classifier --run-dir runs/clf --preset tiny-classifier --data shards/digits \
      --set val_data=shards/digits-val total_steps=300
Rerunning the same command resumes from the run's latest complete checkpoint.
"""
from __future__ import annotations

import argparse

from launch.commands.train import add_common_arguments, run_common

# The trainer polls runtime.preemption at its step boundaries: under SLURM a signal that comes while it
# starts up waits for its first checkpoint instead of requeueing a job that has done nothing.
POLLS_PREEMPTION = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "classifier")
    parser.add_argument("--val-data", default=None, help="validation shards (centre crops), evaluated every eval_every steps and at the end")


def run(args) -> int:
    return run_common(args, "classifier", val_data=args.val_data)
