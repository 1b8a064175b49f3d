"""Check a cluster's launch and requeue machinery before a long job depends on it.

    python -m slurm.check --cluster PROFILE [--nodes N] [--gpus-per-node G] [--tasks-per-node T] [--requeue]

submits one short job with the same resources and rendezvous as `adm submit`; every task sets up
torch.distributed through runtime.distributed and all-reduces its rank. It prints one line per task
(host, rank, local rank, device, master address) and fails if any task disagrees.

With --requeue it instead runs a small deterministic checkpointing job (a chain of SHA-256 digests),
signals it mid-run the way SLURM does before a time limit, and checks that the job was requeued and
resumed from its checkpoint to exactly the digest an uninterrupted run computes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from runtime import preemption
from slurm.stage_job import GuardedJob


def all_reduce_check() -> dict:
    """Inside a job task: set up torch.distributed, all-reduce (rank + 1), and report what was seen."""
    import torch
    import torch.distributed as dist

    from runtime import distributed

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


def chain_digest(steps: int, start: tuple[int, str] | None = None) -> str:
    """The digest after `steps` steps of the counting job (from step 0, or from a saved (step, digest))."""
    step, digest = start or (0, hashlib.sha256(b"adm-guided requeue check").hexdigest())
    for k in range(step, steps):
        digest = hashlib.sha256(f"{digest}:{k}".encode()).hexdigest()
    return digest


class CountingJob(GuardedJob):
    """A deterministic checkpointing job: `steps` steps of a digest chain, one every `step_s` seconds.

    Saves (step, digest) every `save_every` steps under OUT/checkpoints/ and resumes from the latest.
    With `poll`, it also saves and stops as soon as a signal comes (runtime.preemption); without, it
    behaves like a stage that only writes periodic checkpoints. Every task computes the chain; rank 0
    writes the files, and OUT/starts.txt gets one line per (re)start.
    """

    def __init__(self, out_dir: str, steps: int, step_s: float, save_every: int, poll: bool,
                 grace_s: float = 30.0) -> None:
        super().__init__(grace_s)
        self.out_dir, self.steps, self.step_s, self.save_every, self.poll = out_dir, steps, step_s, save_every, poll

    def polls_preemption(self) -> bool:
        """A polling CountingJob is cooperative from the start (see runtime.preemption.Guard)."""
        return self.poll

    def _latest(self) -> tuple[int, str] | None:
        folder = Path(self.out_dir) / "checkpoints"
        found = sorted(folder.glob("step_*.json")) if folder.is_dir() else []
        if not found:
            return None
        saved = json.loads(found[-1].read_text())
        return saved["step"], saved["digest"]

    def _save(self, is_main: bool, step: int, digest: str) -> None:
        from runtime.files import atomic_write_json

        if is_main:
            atomic_write_json(Path(self.out_dir) / "checkpoints" / f"step_{step:06d}.json",
                              {"step": step, "digest": digest})

    def work(self) -> dict:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            from runtime import distributed
        else:
            # One task needs no process group, and skipping torch's import keeps restarts quick.
            distributed = _SingleProcess()
        info = distributed.setup()
        try:
            step, digest = self._latest() or (0, chain_digest(0))
            if info.is_main:
                with open(Path(self.out_dir) / "starts.txt", "a") as log:
                    log.write(f"{step}\n")
            print(f"[check] rank {info.rank}/{info.world_size}: starting at step {step}", flush=True)
            while step < self.steps:
                if self.poll and preemption.requested_everywhere():
                    self._save(info.is_main, step, digest)
                    raise preemption.Preempted(f"saved step {step}")
                digest = chain_digest(step + 1, (step, digest))
                step += 1
                time.sleep(self.step_s)
                if step % self.save_every == 0:
                    self._save(info.is_main, step, digest)
            distributed.barrier()
        finally:
            distributed.cleanup()
        return {"rank": info.rank, "step": step, "digest": digest}


class _SingleProcess:
    """runtime.distributed's interface for one process, without importing torch."""

    class _Info:
        rank, world_size, is_main = 0, 1, True

    def setup(self):
        return self._Info()

    def barrier(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


def requeue_check(profile, resources, out_dir: Path, steps: int = 40, step_s: float = 0.25, save_every: int = 5,
                  poll: bool = True, signal_name: str = "USR1", timeout_s: float = 300.0) -> dict:
    """Submit a CountingJob, signal it after its first checkpoint, and check it resumed to the right digest.

    Returns a report (job id, restarts, start steps, digest). Raises RuntimeError when the job did not
    requeue, did not complete, or ended with a different digest than an uninterrupted run.
    """
    from slurm import jobs, submission

    out_dir = Path(out_dir).absolute()
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    job = CountingJob(str(out_dir), steps, step_s, save_every, poll, grace_s=profile.grace_s)
    submitted = submission.submit_function(job, profile=profile, resources=resources, log_dir=out_dir / "logs",
                                           job_name="adm-requeue-check")
    deadline = time.monotonic() + timeout_s
    while job._latest() is None:
        state = jobs.states([submitted.job_id])[submitted.job_id]
        if jobs.is_finished(state) or time.monotonic() > deadline:
            raise RuntimeError(f"job {submitted.job_id} is {state} before its first checkpoint; "
                               f"see {submitted.log_path}")
        time.sleep(0.2)
    # What SLURM does before a time limit (--signal) and what `scancel --signal` does for preemption.
    subprocess.run(["scancel", f"--signal={signal_name}", submitted.job_id], check=True)
    final = jobs.wait([submitted.job_id], poll_s=1.0, timeout_s=max(1.0, deadline - time.monotonic()),
                      fallback=lambda job_id: submission.result_state(submitted.log_dir, job_id))
    details = jobs.show_job(submitted.job_id)
    starts = [int(line) for line in (out_dir / "starts.txt").read_text().split()]
    report = {"job_id": submitted.job_id, "state": final[submitted.job_id], "restarts": int(details.get("Restarts", -1)),
              "starts": starts, "log": str(submitted.log_path)}
    if report["state"] != jobs.DONE:
        raise RuntimeError(f"requeue check: job ended {report['state']}: {report}")
    results = submission.task_results(submitted.log_dir, submitted.job_id,
                                      resources.resolved().nodes * resources.resolved().tasks_per_node)
    expected = chain_digest(steps)
    report["digest"] = results[0]["digest"]
    if len(starts) < 2 or starts[-1] == 0:
        raise RuntimeError(f"requeue check: the job did not resume from a checkpoint: {report}")
    if any(r["digest"] != expected or r["step"] != steps for r in results):
        raise RuntimeError(f"requeue check: final digest differs from an uninterrupted run ({expected}): {results}")
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
    parser.add_argument("--requeue", action="store_true", help="check signal -> checkpoint -> requeue -> resume instead")
    parser.add_argument("--signal", default="USR1", help="signal for --requeue (USR1, USR2, as SLURM sends them)")
    args = parser.parse_args(argv)
    try:
        profile = profiles.load_profile(args.cluster)
        resources = profile.resources.merged(profiles.Resources(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            time_min=args.time_min))
        if args.requeue:
            report = requeue_check(profile, resources, Path(args.log_dir), signal_name=args.signal)
            print(f"OK: job {report['job_id']} was requeued {report['restarts']} time(s), started at steps "
                  f"{report['starts']}, and ended with the uninterrupted run's digest {report['digest'][:16]}...")
            return 0
        submitted = submission.submit_function(all_reduce_check, profile=profile, resources=resources,
                                               log_dir=Path(args.log_dir), job_name="adm-check")
    except (ValueError, FileNotFoundError) as err:
        print(f"slurm.check: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"slurm.check: failed: {err}", file=sys.stderr)
        return 1
    print(f"submitted job {submitted.job_id}; logs in {submitted.log_dir}/")
    final = jobs.wait([submitted.job_id], poll_s=0.5,
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
