"""`python -m slurm.run STAGE [ARGS...]`: one adm stage under runtime.preemption's signal handling.

What the sbatch templates (slurm/templates/) start on every process, under torchrun. A stage that
polls runtime.preemption checkpoints and stops on SIGTERM (sent when the batch script requeues the job
before its time limit); SIGUSR1/SIGUSR2 sent to the processes themselves requeue the job from rank 0
with `scontrol requeue`. Exit status 143 means "stopped early, resume by rerunning".
"""
from __future__ import annotations

import os
import subprocess
import sys

from launch.cli import USER_ERRORS
from runtime import preemption
from slurm.stage_job import StageJob


def scontrol_requeue() -> None:
    """Requeue this SLURM job from rank 0 (other ranks do nothing); a no-op outside SLURM."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if preemption.process_rank() != 0 or not job_id:
        return
    print(f"[adm] requeueing job {job_id}", file=sys.stderr, flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)


def main(argv: list[str] | None = None) -> int:
    """Run `adm STAGE ARGS...` guarded; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    grace = float(os.environ.get("ADM_PREEMPT_GRACE_S", "120"))
    try:
        StageJob(argv[0], argv[1:], grace_s=grace).run_guarded(scontrol_requeue)
    except USER_ERRORS as err:
        print(f"adm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the stage returned a non-zero status
        print(f"adm {argv[0]}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
