"""The `adm` command line.

Each subcommand lives in its own module under `launch/commands/` (or is named here with its module)
and provides `add_arguments(parser)` and `run(args) -> int`. Only the chosen subcommand's module is
imported, so `adm --help` is instant and a broken optional dependency of one stage cannot break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-imagenet": ("launch.commands.prepare_imagenet", "convert ImageNet (train tar, class folders or val) to WebDataset shards"),
    "inspect-shards": ("launch.commands.inspect_shards", "count, check and preview a folder of shards"),
    "train": ("launch.commands.train", "train an ADM diffusion model (hybrid loss)"),
    "train-classifier": ("launch.commands.train_classifier", "train the noisy ImageNet classifier used for guidance"),
    "export": ("launch.commands.export", "export a run's EMA weights in our format and OpenAI's"),
    "sample": ("launch.commands.sample", "draw (guided) samples into an .npz, on one process or many"),
    "make-reference": ("launch.commands.make_reference", "build a reference batch (.npz with statistics) from shards"),
    "evaluate": ("launch.commands.evaluate", "FID, sFID, IS, precision and recall of a sample file against a reference batch"),
    "report": ("launch.commands.report", "Markdown/HTML report from runs or metrics.json files"),
    "submit": ("launch.commands.submit", "submit one stage to SLURM through submitit"),
    "pipeline": ("launch.commands.pipeline", "run prepare -> train -> sample -> evaluate -> report, on SLURM or locally"),
    "demo": ("launch.commands.demo", "the whole pipeline on small real data in minutes on a CPU"),
}


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """Return the argument parser of subcommand `name` and its module."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"adm {name}", description=(module.__doc__ or help_text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the examples in docstrings as written
    )
    module.add_arguments(parser)
    return parser, module


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: adm COMMAND [options]   (adm COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adm` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"adm: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    args = parser.parse_args(argv[1:])
    try:
        code = module.run(args)
    except (ValueError, FileNotFoundError) as err:
        # User errors: one clear line, no traceback.
        print(f"adm {name}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
