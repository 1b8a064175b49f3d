"""Draw (guided) samples into OUT/samples_{N}x{H}x{W}x3.npz, on one process or many (torchrun / srun).

Every sample index has its own seed and label, so the file does not depend on the number of
processes, and a killed job restarted with the same command continues from its finished shards.
See docs/sampling.md.
"""
from __future__ import annotations

import argparse

from launch.choices import COMPILE_MODES, PRECISIONS, SAMPLERS, SKIP_TYPES
from runtime.names import int_at_least, number_in


def _scale(text: str):
    """A number, or a schedule string such as linear:10:1 (checked when the run starts)."""
    try:
        return float(text)
    except ValueError:
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `adm sample`."""
    what = parser.add_argument_group("what to sample")
    what.add_argument("--model", required=True, help="our model file, openai:FILE (a released checkpoint) or a training run directory")
    what.add_argument("--preset", default=None, help="configuration of --model (needed for openai: files whose name is not the released one)")
    what.add_argument("--classifier", default=None, help="noisy classifier for guidance (same forms as --model)")
    what.add_argument("--classifier-preset", default=None, help="configuration of --classifier")
    what.add_argument("--classifier-scale", type=_scale, default=None,
                      help="classifier guidance scale s, or a schedule linear|cosine:START:END, either limited to original "
                           "timesteps LO..HI with @LO:HI, e.g. 4@200:800 (default 1.0 with a classifier)")
    what.add_argument("--cfg-scale", type=_scale, default=None,
                      help="classifier-free guidance weight w: eps_u + w (eps_c - eps_u), same forms as --classifier-scale "
                           "(outside an @LO:HI interval w = 1); needs a model with a null class")
    what.add_argument("--num-samples", type=int_at_least(1), default=None, help="how many samples (default with --upsample-from: all of the base file)")
    what.add_argument("--labels", default=None,
                      help="uniform (default; i.i.d. per index as the original), balanced (equal counts, shuffled) or a file (.npy/.npz/.txt)")
    what.add_argument("--seed", type=int_at_least(0), default=0, help="run seed; sample i uses a generator derived from (seed, i)")
    what.add_argument("--upsample-from", default=None, help="ADM-U stage: the base samples (.npz) to upsample with a super-resolution --model")
    how = parser.add_argument_group("how")
    how.add_argument("--steps", default="250",
                     help="timestep respacing: 250, ddim25, 10,10,10, ... ('' = every training step); or DPM-Solver++ "
                          "in N network evaluations: dpm++2m-N (second order), dpm++1-N (first order)")
    how.add_argument("--sampler", choices=SAMPLERS, default=None,
                     help="default: dpm++ for dpm++ steps, ddim when --steps starts with ddim, else ddpm")
    how.add_argument("--eta", type=number_in(0.0, 1.0), default=0.0, help="DDIM stochasticity (0 = deterministic)")
    how.add_argument("--skip-type", choices=SKIP_TYPES, default=None,
                     help="DPM-Solver++ time grid: even in t (default), in log-SNR or in sqrt(t)")
    how.add_argument("--thresholding", action="store_true",
                     help="DPM-Solver++: dynamic thresholding of the predicted x0 (0.995 quantile)")
    how.add_argument("--solver-start", type=number_in(0.0, low_open=True), default=None, metavar="T",
                     help="DPM-Solver++: original timestep of the first evaluation (default: where lambda = -5.1, "
                          "the reference's start; 999 for linear-schedule models, 995.08 for cosine)")
    how.add_argument("--no-clip-denoised", dest="clip_denoised", action="store_false",
                     help="DDPM, DDIM: do not clamp the predicted x0 to [-1, 1] (DPM-Solver++ never clamps it; see --thresholding)")
    how.add_argument("--rounding", choices=["truncate", "round"], default="truncate",
                     help="float -> uint8: truncate as the original (default) or round to nearest")
    how.add_argument("--batch-size", type=int_at_least(1), default=16, help="samples computed together on each process")
    how.add_argument("--network-batch", type=int_at_least(1), default=None,
                     help="rows per network call (default: --batch-size); keep it fixed to get the same bits "
                          "with any --batch-size")
    how.add_argument("--precision", choices=PRECISIONS, default="fp32", help="network arithmetic (guidance stays float32)")
    how.add_argument("--allow-slow-precision", action="store_true", help="run bf16/fp16 on a CPU without native support")
    how.add_argument("--compile", choices=COMPILE_MODES, default="none",
                     help="torch.compile the networks (reduce-overhead adds CUDA graphs)")
    how.add_argument("--device", default=None, help="force a device (e.g. cpu); default: this rank's GPU, else cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder (samples_*.npz, options.json, grid.png, shards/ while running)")
    out.add_argument("--shard-size", type=int_at_least(1), default=512, help="samples per shard file (the unit of restart)")
    out.add_argument("--overwrite", action="store_true", help="replace samples in --out made with other options (same options: resume)")
    out.add_argument("--keep-shards", action="store_true", help="keep shards/ after the merge")
    out.add_argument("--grid-size", type=int_at_least(0), default=64, help="samples in grid.png (0: none)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    plan = parser.add_argument_group("dry-run plan")
    plan.add_argument("--dry-run", action="store_true", help="print the memory/time plan (JSON on stdout, a table "
                      "on stderr) and exit; loads no weights where the preset is known, writes nothing")
    plan.add_argument("--world-size", type=int, default=None, help="GPUs (default: $WORLD_SIZE or $SLURM_NTASKS, else 1)")
    plan.add_argument("--gpu", default=None, help="GPU model to plan for (default: this machine's GPU, else H200)")
    plan.add_argument("--mfu", type=float, default=0.4, help="MFU the speed is stated at (default 0.4)")

_PLAN_ONLY = ("dry_run", "world_size", "gpu", "mfu")


def run(args: argparse.Namespace) -> int:
    """Run the sampling job described by the parsed flags."""
    if args.dry_run:
        return _dry_run(args)
    from launch.sample.job import sample
    from launch.sample.options import SampleOptions

    sample(SampleOptions(**{k: v for k, v in vars(args).items() if k not in _PLAN_ONLY}))
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    import json
    import sys

    from launch.plan import format_plan, preset_of_spec, sampling_plan, world_size_from_env

    model = preset_of_spec(args.model, args.preset)
    clf = preset_of_spec(args.classifier, args.classifier_preset) if args.classifier else None
    plan = sampling_plan(model, clf, args.steps, args.network_batch or args.batch_size, args.precision,
                         cfg_guidance=args.cfg_scale is not None,
                         world_size=args.world_size if args.world_size is not None else world_size_from_env(),
                         gpu=args.gpu, mfu=args.mfu)
    print(format_plan(plan), file=sys.stderr)
    print(json.dumps(plan, indent=2))
    return 0
