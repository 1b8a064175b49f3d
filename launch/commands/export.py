"""Export a training run's EMA weights in our model-file format and in OpenAI's key names.

Writes RUN/export/model.pt (weights + resolved preset; `adm sample --model` reads it) and
RUN/export/model_openai.pt (a plain state dict the original guided-diffusion code loads strictly).

Example:
  adm export runs/adm64 --ema-rate 0.9999
"""
from __future__ import annotations

import argparse

from runtime.names import int_at_least, number_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of `adm train` or `adm train-classifier`")
    parser.add_argument("--out", default=None, help="output folder (default RUN/export)")
    parser.add_argument("--ema-rate", type=number_in(0.0, 1.0, low_open=True), default=None, help="which EMA to export (default: the run's first rate)")
    parser.add_argument("--step", type=int_at_least(0), default=None, help="checkpoint step to export (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of an EMA")
    parser.add_argument("--safetensors", action="store_true", help="write model.safetensors instead of model.pt")


def run(args) -> int:
    from launch.train.export import export_run

    out = export_run(args.run_dir, args.out, ema_rate=args.ema_rate, step=args.step, use_ema=not args.no_ema,
                     safetensors=args.safetensors)
    print(f"step {out['step']} ({out['weights']}):\n  {out['model']}\n  {out['openai']}")
    return 0
