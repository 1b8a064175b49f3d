"""The `adm` command line.

Each subcommand lives in its own module, named in `COMMANDS` by its import path (launch/commands/ for
the jobs, slurm/commands/ for `submit` and `pipeline`, which drive SLURM), and provides
`add_arguments(parser)` and `run(args) -> int`. Only the chosen subcommand's module is imported, so
`adm --help` is instant, a broken optional dependency of one stage cannot break the others, and this
module never imports the SLURM layer above it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-digits": ("launch.commands.make_digits", "write 5,000 real MNIST digits as class folders (the demo's dataset)"),
    "prepare-imagenet": ("launch.commands.prepare_imagenet", "convert ImageNet (train tar, class folders or val) to WebDataset shards"),
    "inspect-shards": ("launch.commands.inspect_shards", "count, check and preview a folder of shards"),
    "train": ("launch.commands.train", "train an ADM diffusion model (hybrid loss)"),
    "train-classifier": ("launch.commands.train_classifier", "train the noisy ImageNet classifier used for guidance"),
    "export": ("launch.commands.export", "export a run's EMA weights in our format and OpenAI's"),
    "sample": ("launch.commands.sample", "draw (guided) samples into an .npz, on one process or many"),
    "make-reference": ("launch.commands.make_reference", "build a reference batch (.npz with statistics) from shards"),
    "evaluate": ("launch.commands.evaluate", "FID, sFID, IS, precision and recall of a sample file against a reference batch"),
    "report": ("launch.commands.report", "Markdown/HTML report from runs or metrics.json files"),
    "submit": ("slurm.commands.submit", "submit one stage to SLURM through submitit"),
    "pipeline": ("slurm.commands.pipeline", "run prepare -> train -> sample -> evaluate -> report, on SLURM or locally"),
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


# Commands that launch jobs themselves make no sense as a stage of a job or a pipeline.
NOT_STAGES = {"submit", "pipeline"}


def stage_commands() -> list[str]:
    """The `adm` commands that can run as a stage (a SLURM job or a pipeline step), in pipeline order."""
    return [name for name in COMMANDS if name not in NOT_STAGES]


def parse_stage_args(command: str, argv: list[str]) -> tuple[argparse.Namespace, object]:
    """Parse `argv` with `adm COMMAND`'s own parser; return (namespace, command module).

    Used before anything is submitted or run, so a typo fails in a second, not hours later when the
    job starts. Raises ValueError naming the command for an unknown command, a command not
    installed, or options the command rejects.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown stage {command!r}; stages: {', '.join(stage_commands())}")
    if command in NOT_STAGES:
        raise ValueError(f"'adm {command}' submits jobs itself and cannot run as a stage; "
                         f"stages: {', '.join(stage_commands())}")
    module_name = COMMANDS[command][0]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(f"stage {command!r} is not available in this installation ({module_name} is missing)") from None
    parser, module = build_parser(command)

    def error(message: str) -> None:
        raise ValueError(f"adm {command}: {message}\n{parser.format_usage().strip()}")

    # argparse would print and exit; the caller decides (and names the stage).
    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args([str(a) for a in argv]), module


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
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as stop:  # argparse has printed the usage and its one-line error (or the help)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        code = module.run(args)
    except USER_ERRORS as err:
        # Inputs a user can get wrong (or be handed): one clear line, no traceback.
        print(f"adm {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"adm {name}: error: out of memory (an input declares more data than this machine holds, "
              "or the batch size is too large)", file=sys.stderr)
        return 2
    except Exception as err:
        from runtime.distributed import describe_failure

        note = describe_failure(err)
        if note:  # a lost rank or node: say which before the traceback
            print(f"adm {name}: {note}", file=sys.stderr, flush=True)
        raise
    return int(code or 0)


def _user_errors() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile

    # ValueError covers json/toml/unicode decoding; the OSErrors are paths that are missing or not
    # ours to write; pickle and zip errors come from damaged files that slipped past a loader's checks.
    return (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
            pickle.UnpicklingError, zipfile.BadZipFile)


USER_ERRORS = _user_errors()


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (ValueError, OSError)):
        return text  # our own messages (a usage line may follow on purpose)
    return f"unreadable or unsafe file: {text.splitlines()[0]}"


if __name__ == "__main__":
    sys.exit(main())
