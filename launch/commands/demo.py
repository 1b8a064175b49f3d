"""The whole pipeline on 5,000 real MNIST digits in minutes on a CPU: prepare shards, train an
unconditional ADM UNet and a noisy classifier, sample at classifier scales 0, 1, 2, 4, 8, 16, 32, evaluate
(class accuracy, FID with domain features, precision, recall) and write a report.

Rerunning the same command skips the stages already finished. See docs/demo.md.
"""
from __future__ import annotations

import argparse

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `adm demo`."""
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out); a rerun resumes it")
    parser.add_argument("--quick", action="store_true", help="smaller run, under 4 minutes on two CPU cores (CI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="change a demo setting (launch.demo.DemoSettings), e.g. --set num_samples=500")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--steps-sweep", action="store_true",
                        help="also sample and evaluate DDPM-250, DDIM-25/15 and DPM-Solver++(2M) at 10-25 evaluations "
                             "at two scales, with standard errors: report_steps/ (docs/demo.md; long: DDPM-250)")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the guidance sweep and where the report is."""
    from pathlib import Path

    import sys

    from launch.demo import check_guidance, run_demo, summary_table
    from launch.pipeline import StageFailed

    sets = [item for group in args.set for item in group]
    try:
        report = run_demo(args.out, quick=args.quick, overrides=sets, threads=args.threads,
                          log=lambda line: print(line, flush=True), steps_sweep=args.steps_sweep)
    except StageFailed as failure:
        if failure.tail:
            print(f"--- last lines of {failure.log} ---\n{failure.tail}\n---", file=sys.stderr)
        print(f"adm demo: error: {failure}", file=sys.stderr)
        return 1
    print()
    print(summary_table(report))
    # The 8 px quick run does not show the precision / recall trade-off (docs/demo.md), so only
    # the full run is held to it.
    fails = check_guidance(report["guidance_sweep"], precision_recall=not args.quick)
    first, last = report["guidance_sweep"][0], report["guidance_sweep"][-1]
    if fails:
        print("\nguidance did NOT show the expected effect: " + "; ".join(fails))
    else:
        print(f"\nguidance works: class accuracy {first['class_accuracy']:.2f} -> {last['class_accuracy']:.2f} "
              f"(chance 0.10), FID {first['fid']:.1f} -> {last['fid']:.1f} (scale {first['scale']:g} -> {last['scale']:g})")
    if args.quick:
        trend = "not checked at 8 px, where guidance does not show the paper's trade-off"
    elif any("precision" in f or "recall" in f for f in fails):
        trend = "NOT the paper's trade-off"
    else:
        trend = "the paper's trade-off, precision up and recall down"
    print(f"precision {first['precision']:.3f} -> {last['precision']:.3f}, recall {first['recall']:.3f} -> "
          f"{last['recall']:.3f}: {trend} (docs/demo.md)")
    seconds = report.get("stage_seconds", {})
    print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"\nreport: {Path(args.out) / 'report' / 'report.html'} (also report.md, report.json)")
    if args.steps_sweep:
        from launch.demo import steps_summary

        print("\n" + steps_summary(report["steps_report"]))
        print(f"steps report: {Path(args.out) / 'report_steps' / 'report.html'}")
    return 0
