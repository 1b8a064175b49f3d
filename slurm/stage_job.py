"""The callables that submitit runs on every task of a job, requeued on preemption.

`GuardedJob` installs runtime.preemption's signal handling around its `work()`; on a requeue signal the
job is checkpointed the submitit way (the same call is pickled again) and requeued, and the work
resumes from the latest checkpoint it wrote when it restarts. `StageJob` is one `adm` stage: each task
(one per GPU) parses the stage's options and calls its `run(args)` in-process, so the stage sets up
torch.distributed from SLURM's variables (runtime.distributed.setup) and sees the signals.
"""
from __future__ import annotations

import importlib
import os
import shlex
import signal
import socket
import sys

import submitit

from runtime import distributed, preemption
from launch.cli import parse_stage_args


class PeerLost(RuntimeError):
    """A collective failed because another rank (or its node) went away; the message names it."""


AFTER_A_LOST_NODE = ("If a node failed, SLURM requeues the job once it marks the node DOWN (the job was submitted "
                     "with --requeue) and the stage resumes from its last checkpoint; otherwise rerun the same "
                     "command, which resumes from it too.")


def _submitit_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class GuardedJob(submitit.helpers.Checkpointable):
    """A checkpointable job whose `work()` may poll runtime.preemption and raise Preempted.

    `grace_s` bounds how long work that polls may take to save and stop after a signal.
    """

    def __init__(self, grace_s: float = 60.0) -> None:
        self.grace_s = grace_s

    def work(self):
        """The job's body; subclasses implement it."""
        raise NotImplementedError

    def polls_preemption(self) -> bool:
        """Whether `work()` polls runtime.preemption (then a signal during its start-up waits for it)."""
        return False

    def __call__(self):
        # submitit's own handler (installed before this call) knows how to re-pickle this job and
        # requeue it, counting time-outs; it acts on rank 0 and returns on the others.
        submitit_handler = signal.getsignal(_submitit_signal())

        def requeue() -> None:
            if callable(submitit_handler):
                submitit_handler(_submitit_signal(), None)

        return self.run_guarded(requeue)

    def run_guarded(self, requeue):
        """Run `work()` with runtime.preemption's handlers; `requeue()` requeues the job (see Guard)."""
        guard = preemption.Guard(requeue, self.grace_s, cooperative=self.polls_preemption()).install()
        done = False
        try:
            result = self.work()
            done = True
            return result
        except preemption.Preempted as stop:
            print(f"[adm] rank {preemption.process_rank()}: stopped early: {stop}", flush=True)
            guard.finish_preempted()
            raise  # not reached: finish_preempted exits
        finally:
            # A signal after the work completed (the time limit came as it finished) changes nothing.
            guard.uninstall(work_done=done)


class StageJob(GuardedJob):
    """`adm COMMAND ARGV...` as a checkpointable submitit job."""

    def __init__(self, command: str, argv: list[str], grace_s: float = 60.0) -> None:
        super().__init__(grace_s)
        self.command = command
        self.argv = [str(a) for a in argv]

    def __repr__(self) -> str:
        return f"StageJob(adm {self.command} {shlex.join(self.argv)})"

    def polls_preemption(self) -> bool:
        """True for stages whose command module says `POLLS_PREEMPTION = True` (training)."""
        from launch.cli import COMMANDS

        if self.command not in COMMANDS:
            return False  # work() names the problem
        module = importlib.import_module(COMMANDS[self.command][0])
        return bool(getattr(module, "POLLS_PREEMPTION", False))

    def work(self) -> int:
        """Parse the stage's options and run it; a non-zero exit status fails the job."""
        args, module = parse_stage_args(self.command, self.argv)
        # torchrun's numbering when under it (templates), else srun's (one task per GPU).
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        print(f"[adm] rank {rank}/{world} on {socket.gethostname()}: adm {self.command} "
              f"{shlex.join(self.argv)}", flush=True)
        try:
            code = module.run(args)
        except Exception as err:
            note = distributed.describe_failure(err)
            if note is None:
                raise
            print(f"[adm] {note}", file=sys.stderr, flush=True)
            raise PeerLost(f"{note}. {AFTER_A_LOST_NODE}") from err
        if code and preemption.reason() is not None:
            # The stage caught its own Preempted after checkpointing and returned a status.
            raise preemption.Preempted(f"adm {self.command} stopped with status {code} after a signal")
        if code:
            print(f"[adm] adm {self.command} ended with exit status {code}", file=sys.stderr, flush=True)
            raise RuntimeError(f"adm {self.command} ended with exit status {code}")
        return 0
