"""Check a cluster's multi-node launch before a long job depends on it.

    python -m slurm.check --cluster PROFILE [--nodes N] [--gpus-per-node G] [--tasks-per-node T]

submits one short job with the same resources and rendezvous as `adm submit`; every task sets up
torch.distributed through launch.distributed and all-reduces its rank. It prints one line per task
(host, rank, local rank, device, master address) and fails if any task disagrees.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def all_reduce_check() -> dict:
    """Inside a job task: set up torch.distributed, all-reduce (rank + 1), and report what was seen."""
    import torch
    import torch.distributed as dist

    from launch import distributed

    info = distributed.setup()
    try:
        value = torch.tensor([float(info.rank + 1)], device=info.device)
        hosts = [socket.gethostname()]
        if info.world_size > 1:
            dist.all_reduce(value)
            hosts = [None] * info.world_size
            dist.all_gather_object(hosts, socket.gethostname())
        expected = info.world_size * (info.world_size + 1) / 2
        report = {
            "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
            "device": str(info.device), "host": socket.gethostname(), "hosts": hosts,
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "master": f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}",
            "sum": float(value.item()), "expected": expected,
        }
    finally:
        distributed.cleanup()
    if report["sum"] != expected:
        raise RuntimeError(f"all_reduce gave {report['sum']} on rank {info.rank}, expected {expected}: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of `python -m slurm.check`."""
    from slurm import jobs, profiles, submission

    parser = argparse.ArgumentParser(prog="python -m slurm.check", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--cluster", required=True, help=f"profile: {', '.join(profiles.available_profiles())} or a YAML path")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--tasks-per-node", type=int)
    parser.add_argument("--time", type=int, default=10, dest="time_min", help="minutes (default 10)")
    parser.add_argument("--log-dir", default="slurm-logs/check", help="submitit folder (default slurm-logs/check)")
    args = parser.parse_args(argv)
    try:
        profile = profiles.load_profile(args.cluster)
        resources = profile.resources.merged(profiles.Resources(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            time_min=args.time_min))
        submitted = submission.submit_function(all_reduce_check, profile=profile, resources=resources,
                                               log_dir=Path(args.log_dir), job_name="adm-check")
    except (ValueError, FileNotFoundError) as err:
        print(f"slurm.check: error: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {submitted.job_id}; logs in {submitted.log_dir}/")
    final = jobs.wait([submitted.job_id], poll_s=2.0,
                      fallback=lambda job_id: submission.result_state(submitted.log_dir, job_id))
    try:
        reports = submission.task_results(submitted.log_dir, submitted.job_id,
                                          resources.resolved().nodes * resources.resolved().tasks_per_node)
    except (RuntimeError, FileNotFoundError) as err:
        print(f"slurm.check: job {submitted.job_id} ended {final[submitted.job_id]}: {err}", file=sys.stderr)
        return 1
    for r in sorted(reports, key=lambda r: r["rank"]):
        print(f"rank {r['rank']}/{r['world_size']} local {r['local_rank']} on {r['host']} ({r['device']}, "
              f"{r['backend']}), master {r['master']}: all_reduce {r['sum']:g} (expected {r['expected']:g})")
    print(f"OK: {len(reports)} tasks on {len(set(reports[0]['hosts']))} node(s) agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
