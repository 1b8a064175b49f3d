"""Submit one stage to SLURM through submitit: `adm submit STAGE [stage options] --cluster PROFILE [...]`.

The stage's own options are checked with its real parser before anything is submitted; the job runs
one task per GPU (`--tasks-per-node` for CPU-only jobs), each task runs the stage in-process, and
torch.distributed is set up from SLURM's variables. A preemption or time-limit signal checkpoints
and requeues the job; the stage resumes from its latest checkpoint. Submit options may come before
or after STAGE; put stage options after `--` if a stage ever shares a name with one of them.

examples:
  adm submit train --preset adm64 --run-dir runs/adm64 --data shards/ --cluster ./my-cluster.yaml --nodes 4
  adm submit sample --model runs/adm64 --num-samples 50000 --out samples/adm64 --cluster example-a100 --gpus-per-node 8
  adm submit train --run-dir runs/t --preset tiny-unet --data shards/ --cluster local --tasks-per-node 2 --wait
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from runtime.names import int_at_least


def _submit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("submission")
    group.add_argument("--cluster", metavar="PROFILE", default=None,
                       help="cluster profile: a name shipped in slurm/ (local, example-a100, ...) or a YAML path "
                            "(default: $ADM_CLUSTER)")
    group.add_argument("--nodes", type=int_at_least(1), default=None, help="number of nodes (default: the profile's)")
    group.add_argument("--gpus-per-node", type=int_at_least(0), default=None, help="GPUs per node; one task per GPU")
    group.add_argument("--tasks-per-node", type=int_at_least(1), default=None,
                       help="tasks per node (default: one per GPU; set it for CPU-only jobs, which use gloo)")
    group.add_argument("--cpus-per-task", type=int_at_least(1), default=None)
    group.add_argument("--mem", default=None, help="memory per node in sbatch's syntax, e.g. 480G (0 = all)")
    group.add_argument("--time", type=int_at_least(1), default=None, dest="time_min", metavar="MINUTES",
                       help="time limit; the job is requeued before it and resumes from its checkpoint")
    group.add_argument("--job-name", default=None)
    group.add_argument("--log-dir", default=None, help="submitit folder for scripts and logs "
                                                       "(default: slurm-logs/STAGE)")
    group.add_argument("--after", default=None, metavar="JOBID[,JOBID]", help="start after these jobs succeed")
    group.add_argument("--wait", action="store_true", help="wait for the job; exit 1 if it does not complete")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Submit options, then STAGE and everything after it (the stage's options)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _submit_options(parser)
    parser.add_argument("stage", metavar="STAGE",
                        help="prepare-imagenet, train, train-classifier, sample, evaluate, make-reference, report, ...")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the stage's own options (see adm STAGE --help)")


def split_submit_options(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Separate submit options from the stage's options, keeping the stage's in order.

    Everything after a `--` belongs to the stage.
    """
    own = argparse.ArgumentParser(add_help=False)
    _submit_options(own)
    takes_value = {}
    for action in own._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    mine: list[str] = []
    stage: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            stage += tokens[i + 1:]
            break
        name = token.split("=", 1)[0]
        if name in takes_value:
            mine.append(token)
            if takes_value[name] and "=" not in token and i + 1 < len(tokens):
                mine.append(tokens[i + 1])
                i += 1
        else:
            stage.append(token)
        i += 1
    return mine, stage


def run(args: argparse.Namespace) -> int:
    """Validate the stage's options, then submit (or print) the job."""
    from slurm import jobs, profiles, submission
    from launch.cli import parse_stage_args

    mine, stage_argv = split_submit_options(list(args.stage_args))
    own = argparse.ArgumentParser(prog="adm submit", add_help=False)
    _submit_options(own)
    later = own.parse_args(mine)
    # Options given after STAGE win over the same options given before it.
    for key, value in vars(later).items():
        if value is not None and value is not False:
            setattr(args, key, value)

    cluster = args.cluster or os.environ.get("ADM_CLUSTER")
    if not cluster:
        raise ValueError(f"--cluster is required (or set ADM_CLUSTER); profiles: "
                         f"{', '.join(profiles.available_profiles())}, or the path of a YAML file")
    profile = profiles.load_profile(cluster)
    parse_stage_args(args.stage, stage_argv)
    resources = profile.resources.merged(profiles.Resources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time_min=args.time_min))
    res = resources.resolved()
    after = [a for a in (args.after or "").replace(":", ",").split(",") if a]
    log_dir = Path(args.log_dir or Path("slurm-logs") / args.stage).absolute()
    name = args.job_name or f"adm-{args.stage}"
    command_line = f"adm {args.stage} {shlex.join(stage_argv)}".strip()

    if args.dry_run:
        print(submission.sbatch_script(profile, resources, log_dir, name, after))
        print(f"# each of the {res.nodes * res.tasks_per_node} task(s) runs: {command_line}")
        return 0

    submitted = submission.submit_stage(args.stage, stage_argv, profile, resources, log_dir, name, after)
    tasks = res.nodes * res.tasks_per_node
    print(f"submitted job {submitted.job_id} ({name}): {tasks} task(s) on {res.nodes} node(s) of '{profile.name}'")
    print(f"  runs: {command_line}")
    print(f"  log:  {submitted.log_path}")
    print(f"  follow with `tail -f {submitted.log_path}`, `squeue -j {submitted.job_id}`; "
          f"stop with `scancel {submitted.job_id}`")
    if not args.wait:
        return 0
    final = jobs.wait([submitted.job_id], poll_s=0.5,
                      on_change=lambda job_id, state: print(f"job {job_id}: {state}", flush=True),
                      fallback=lambda job_id: submission.result_state(log_dir, job_id))
    state = final[submitted.job_id]
    if state != jobs.DONE:
        print(f"job {submitted.job_id} ended {state}; last lines of {submitted.log_path}:\n"
              f"{submission.tail(submitted.log_path)}")
        return 1
    return 0
