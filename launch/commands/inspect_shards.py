"""Read a folder of shards back: counts per class, missing classes, duplicate keys, undecodable
samples, unreadable shards, and a grid of examples. Exit status 1 if anything is wrong."""
from __future__ import annotations

import argparse
import json

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `adm inspect-shards`."""
    parser.add_argument("shards", help="folder with manifest.json, a glob, or a brace pattern")
    parser.add_argument("--grid", help="write a PNG grid of examples here")
    parser.add_argument("--grid-count", type=int_at_least(0), default=64, help="examples in the grid (default 64)")
    parser.add_argument("--grid-size", type=int_at_least(1), default=64, help="side of each example (ADM centre crop, default 64)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def run(args: argparse.Namespace) -> int:
    """Inspect and print the report."""
    from data.inspect import format_report, inspect_shards, report_is_clean

    report = inspect_shards(args.shards, grid=args.grid, grid_count=args.grid_count, grid_size=args.grid_size)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report_is_clean(report) else 1
