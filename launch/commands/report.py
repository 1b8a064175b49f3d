"""Markdown/HTML report from runs or metrics.json files.

  adm report RUN_OR_METRICS... --out DIR [--title T] [--grid-classes 10] [--grid-per-class 8]

Writes DIR/report.md, DIR/report.html, DIR/report.json and PNGs: the metric table beside the
paper's published numbers, metrics against guidance scale when the runs form a sweep, and sample
grids per class for every run whose sample file is still where metrics.json says.
"""
from __future__ import annotations

import argparse

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("inputs", nargs="+", help="metrics.json files or folders holding them (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the report")
    parser.add_argument("--title", default="ADM evaluation report")
    parser.add_argument("--grid-classes", type=int_at_least(0), default=10, help="classes (rows) per sample grid")
    parser.add_argument("--grid-per-class", type=int_at_least(1), default=8, help="samples per class in a grid")


def run(args) -> int:
    from evaluation.report import build_report

    summary = build_report(args.inputs, args.out, title=args.title, grid_classes=args.grid_classes,
                           grid_per_class=args.grid_per_class)
    print(f"wrote {args.out}/report.md, report.html, report.json ({len(summary['runs'])} runs, "
          f"{len(summary['guidance_sweeps'])} guidance sweeps)")
    return 0
