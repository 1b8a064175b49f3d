"""Run a whole pipeline from a YAML file: prepare -> train diffusion and classifier -> sample (a sweep of
guidance scales) -> evaluate -> report, as SLURM jobs chained by afterok dependencies, or with --local
one stage after another on this machine.

Every stage's options are checked by its own parser before anything runs. A failed stage stops the
pipeline and is named with its log file. Rerunning the same command continues: each stage resumes
from what it already wrote. See slurm/pipeline.example.yaml and docs/slurm.md.

examples:
  adm pipeline slurm/pipeline.example.yaml --var imagenet=/data/ILSVRC2012_img_train.tar --cluster ./my-cluster.yaml
  adm pipeline slurm/pipeline.tiny.yaml --local
  adm pipeline slurm/pipeline.tiny.yaml --cluster local        # the one-node cluster of slurm/local-cluster.sh
"""
from __future__ import annotations

import argparse
import sys

from runtime.names import number_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `adm pipeline`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", metavar="CONFIG.yaml", help="the pipeline file")
    parser.add_argument("--local", action="store_true", help="run the stages here, in order, without SLURM")
    parser.add_argument("--cluster", default=None, metavar="PROFILE",
                        help="cluster profile (default: the file's 'cluster:', else $ADM_CLUSTER)")
    parser.add_argument("--out", default=None, help="output folder (default: the file's 'out:')")
    parser.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                        help="set a {placeholder} of the file (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--detach", action="store_true",
                        help="with SLURM: submit and exit instead of following the jobs to the end")
    parser.add_argument("--poll", type=number_in(0.0, low_open=True), default=5.0, metavar="SECONDS", help="how often to ask SLURM (default 5)")


def _variables(items: list[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--var {item!r} must look like KEY=VALUE")
        result[key] = value
    return result


def run(args: argparse.Namespace) -> int:
    """Load and check the pipeline, then run it locally or submit (and follow) it on SLURM."""
    import os

    from launch.pipeline import StageFailed, describe, load_pipeline, run_local
    from slurm.pipeline_jobs import check_resources

    pipeline = load_pipeline(args.config, out=args.out, variables=_variables(args.var))
    check_resources(pipeline)  # also with --local: a typo in the file is a typo wherever it runs
    print(describe(pipeline), flush=True)
    cluster = None
    if not args.local:
        from slurm import jobs, profiles

        cluster = args.cluster or pipeline.cluster or os.environ.get("ADM_CLUSTER")
        if not cluster:
            raise ValueError(f"no cluster profile: pass --cluster (one of {', '.join(profiles.available_profiles())} "
                             "or a YAML path), set 'cluster:' in the file, or run here with --local")
        profile = profiles.load_profile(cluster)
        if not args.dry_run:
            jobs.require_slurm("Run the pipeline on this machine instead with `adm pipeline CONFIG --local`.")
    if args.dry_run:
        print(f"(dry run: would run {'locally' if args.local else f'on SLURM with profile {cluster}'})")
        return 0
    try:
        if args.local:
            seconds = run_local(pipeline, echo=lambda line: print(line, flush=True))
            print(f"[pipeline] all {len(seconds)} stages done in {sum(seconds.values()):.0f}s; "
                  f"record: {pipeline.out / 'pipeline.json'}")
            return 0
        from slurm.pipeline_jobs import follow, submit_pipeline

        submitted = submit_pipeline(pipeline, profile, echo=lambda line: print(line, flush=True))
        if args.detach:
            print(f"[pipeline] submitted {len(submitted)} jobs; record: {pipeline.out / 'pipeline.json'}; "
                  f"watch with `squeue -u $USER`, cancel with `scancel {' '.join(j.job_id for j in submitted.values())}`")
            return 0
        follow(pipeline, submitted, poll_s=args.poll, echo=lambda line: print(line, flush=True))
        print(f"[pipeline] all {len(submitted)} jobs completed; record: {pipeline.out / 'pipeline.json'}")
        return 0
    except StageFailed as failure:
        if failure.tail:
            print(f"--- last lines of {failure.log} ---\n{failure.tail}\n---", file=sys.stderr)
        print(f"adm pipeline: error: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not args.local:
            print("adm pipeline: stopped following; the submitted jobs keep running "
                  f"(see {pipeline.out / 'pipeline.json'} for their ids)", file=sys.stderr)
        return 130
