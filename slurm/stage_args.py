"""Check a stage's own command-line options before anything is submitted.

`adm submit train --preset adm64 ...` and every pipeline stage are parsed here with the stage's real
parser (launch.cli.build_parser), so a typo fails on the login node in a second, not hours later
when the job starts.
"""
from __future__ import annotations

import argparse
import importlib

from launch.cli import COMMANDS, build_parser

# Commands that launch jobs themselves make no sense inside a job.
NOT_SUBMITTABLE = {"submit", "pipeline"}


def submittable_commands() -> list[str]:
    """The `adm` commands that can run as a SLURM job, in pipeline order."""
    return [name for name in COMMANDS if name not in NOT_SUBMITTABLE]


def parse_stage_args(command: str, argv: list[str]) -> tuple[argparse.Namespace, object]:
    """Parse `argv` with `adm COMMAND`'s own parser; return (namespace, command module).

    Raises ValueError naming the command for an unknown command, a command not installed, or
    options the command rejects.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown stage {command!r}; stages: {', '.join(submittable_commands())}")
    if command in NOT_SUBMITTABLE:
        raise ValueError(f"'adm {command}' submits jobs itself and cannot run as a stage; "
                         f"stages: {', '.join(submittable_commands())}")
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

    # argparse would print and exit; we want the caller to decide (and name the stage).
    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args([str(a) for a in argv]), module
