"""The callable that submitit runs on every task of a job: one `adm` stage, requeued on preemption.

Each task (one per GPU) parses the stage's options and calls its `run(args)` in-process, so the stage
sets up torch.distributed from SLURM's variables (launch.distributed.setup) and sees the signals.
On a requeue signal the job is checkpointed the submitit way (the same call is pickled again) and
requeued; the stage then resumes from the latest checkpoint in its run directory when it restarts.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import sys

import submitit

from slurm import preemption
from slurm.stage_args import parse_stage_args


def _submitit_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class StageJob(submitit.helpers.Checkpointable):
    """`adm COMMAND ARGV...` as a checkpointable submitit job.

    `grace_s` bounds how long a stage that polls `slurm.preemption` may take to save and stop.
    """

    def __init__(self, command: str, argv: list[str], grace_s: float = 60.0) -> None:
        self.command = command
        self.argv = [str(a) for a in argv]
        self.grace_s = grace_s

    def __repr__(self) -> str:
        return f"StageJob(adm {self.command} {shlex.join(self.argv)})"

    def __call__(self) -> int:
        args, module = parse_stage_args(self.command, self.argv)
        rank, world = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
        print(f"[adm submit] rank {rank}/{world} on {socket.gethostname()}: adm {self.command} "
              f"{shlex.join(self.argv)}", flush=True)
        # submitit's own handler (installed before this call) knows how to re-pickle this job and
        # requeue it, counting time-outs; it acts on rank 0 and returns on the others.
        submitit_handler = signal.getsignal(_submitit_signal())

        def requeue() -> None:
            if callable(submitit_handler):
                submitit_handler(_submitit_signal(), None)

        guard = preemption.Guard(requeue, self.grace_s).install()
        try:
            code = module.run(args)
        except preemption.Preempted as stop:
            print(f"[adm submit] rank {rank}: stage stopped early: {stop}", flush=True)
            guard.finish_preempted()
            raise  # not reached: finish_preempted exits
        finally:
            guard.uninstall()
        if code:
            print(f"[adm submit] adm {self.command} ended with exit status {code}", file=sys.stderr, flush=True)
            raise RuntimeError(f"adm {self.command} ended with exit status {code}")
        return 0
