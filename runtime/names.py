"""Checks for names and values that end up in file paths or generated shell scripts.

A name (a pipeline or stage name, a job name, a profile key) becomes a file name and an sbatch line:
only letters, digits and `._-`, not starting with `.` or `-`. Any other value written into a script or
a path (a partition, a memory amount, a folder) must hold no control characters: a newline in
`#SBATCH --job-name=...` ends the comment and starts a shell command on the compute node.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: Any, what: str) -> str:
    """`value` as a name (letters, digits, `._-`; not empty, not starting with `.` or `-`), or ValueError."""
    text = str(value)
    if not _NAME.fullmatch(text) or text in (".", ".."):
        raise ValueError(f"{what} {text!r} is not a valid name: use letters, digits, '.', '_' and '-' "
                         "(not starting with '.' or '-')")
    return text


def check_text(value: Any, what: str) -> str:
    """`value` as text without control characters (newlines, tabs, escapes), or ValueError."""
    text = str(value)
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(f"{what} {text!r} contains the control character {bad.group()!r}; values written into "
                         "job scripts and paths may not hold newlines or other control characters")
    return text


def check_inside(path: str | Path, folder: str | Path, what: str) -> Path:
    """`path` resolved, when it lies inside `folder` (also after resolving links), else ValueError."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{what} {path} lies outside {folder}")
    return resolved


def check_number(value: Any, what: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (`low_open`: low itself excluded), else ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{what} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise ValueError(f"{what} must be <= {high:g}, got {value!r}")
    return number



def parse_error_line(err: BaseException) -> str:
    """A parser's error (YAML's are several lines with a caret drawing) as one line with its position."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def int_at_least(low: int):
    """An argparse `type` for an integer >= `low` (argparse then names the option in its one-line error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type` for a finite number in [low, high] (`low_open`: low excluded)."""
    import argparse

    def parse(text: str) -> float:
        try:
            return check_number(text, "the value", low, high, low_open)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).replace("the value ", "")) from None

    parse.__name__ = "number"
    return parse


__all__ = ["check_name", "check_text", "check_inside", "check_number", "parse_error_line", "int_at_least",
           "number_in"]
