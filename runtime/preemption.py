"""Preemption and time-limit signals: one flag that every stage polls, and the requeue decision.

The one place that turns SIGTERM / SIGUSR1 / SIGUSR2 into "checkpoint and stop". Under SLURM, a
`Guard` (installed by slurm/stage_job.py around a stage) owns the signals and requeues the job; under
torchrun or a plain process, `watch()` installs flag-only handlers. Either way a stage asks
`requested_everywhere()` at a step boundary.

SLURM sends SIGUSR2 (submitit's signal, `$SUBMITIT_PREEMPT_SIGNAL`) `signal_delay_s` before a job's
time limit: the *time-limit warning*. Under a Guard a stage may use the time it leaves
(`requeue_deadline()`): the trainer checkpoints its progress at once, trains on, and checkpoints
again before the Guard's grace period ends. SIGUSR1 (`scancel --signal=USR1 JOB`, a preempting
scheduler) also means checkpoint and requeue, but now: it has no deadline to train on to. SIGTERM
comes from `scancel` or from preemption in SLURM's own requeue mode: checkpoint and stop, now.

A stage takes part by polling at a safe point (a step boundary), writing a checkpoint, and raising
`Preempted`:

    if preemption.requested_everywhere():     # all ranks call it at the same step
        save_checkpoint()
        raise preemption.Preempted("saved step 1200")

Polling once marks the stage as cooperative: a later signal then waits (up to a grace period) for it
to stop by itself. A stage known to poll (`Guard(..., cooperative=True)`: training) is cooperative
from the start, so a requeue signal that arrives during its start-up (a short time limit, a signal
sent early) does not requeue a job that has done nothing: the stage sees the flag at its first poll,
after making progress, checkpoints and stops. A stage that never polls is treated as SLURM would
treat it: a requeue signal requeues at once (the rerun resumes from the latest periodic checkpoint)
and SIGTERM ends it. Whenever the Guard requeues without the stage having stopped by itself, it
says why on stderr (the job's log).

This module imports nothing heavy: stages may import it unconditionally; outside a job it never
reports a request.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

_lock = threading.Lock()
_reason: str | None = None  # None, "requeue" (USR1/USR2) or "stop" (SIGTERM)
_signal_name: str | None = None  # the first signal that set _reason
_polled = False
_signal_at: float | None = None  # time.monotonic() of the first time-limit warning
_urgent = False  # SIGUSR1 or SIGTERM came: stop now, whatever time a warning left
_grace_s: float | None = None  # set by a Guard: how long after the signal it forces the requeue


def time_limit_signal() -> signal.Signals:
    """The time-limit warning: submitit's signal (`$SUBMITIT_PREEMPT_SIGNAL`, SIGUSR2 by default)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class Preempted(Exception):
    """Raised by a stage that saved its state and stopped early because the job was signalled."""


def requested() -> bool:
    """True once this process was asked to stop (preemption, time limit, or scancel)."""
    global _polled
    _polled = True
    return _reason is not None


def reason() -> str | None:
    """"requeue" after SIGUSR1/SIGUSR2, "stop" after SIGTERM, None when no signal came."""
    return _reason


def signal_name() -> str | None:
    """The name of the first stop signal received ("SIGTERM", "SIGUSR2", ...), or None."""
    return _signal_name


def requeue_deadline() -> float | None:
    """The `time.monotonic()` by which a Guard requeues the job anyway after a time-limit warning.

    None when no warning came, when a signal that means "now" came too (SIGUSR1, SIGTERM), or when
    no Guard promised a grace period (torchrun, a plain process): a stage should then checkpoint and
    stop at once.
    """
    if _signal_at is None or _grace_s is None or _urgent:
        return None
    return _signal_at + _grace_s


def _record(signum: int) -> None:
    global _reason, _signal_name, _signal_at, _urgent
    if _signal_name is None:
        _signal_name = signal.Signals(signum).name
    if signum == time_limit_signal():
        if _signal_at is None:
            _signal_at = time.monotonic()
    else:
        _urgent = True
    if signum in REQUEUE_SIGNALS:
        _reason = "requeue"
    elif _reason is None:
        _reason = "stop"


class Watch:
    """Flag-only handlers for the stop signals nobody else handles (torchrun, a plain process).

    Where a `Guard` already owns a signal it is left alone: the Guard sets the same flag.
    """

    SIGNALS = (*REQUEUE_SIGNALS, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def install(self) -> "Watch":
        """Take the signals still at their default action (call from the main thread).

        Without a Guard, a flag left by an earlier stage run in this process is cleared; with one,
        a signal that came during start-up is kept, so the stage still sees it.
        """
        global _reason, _signal_name, _signal_at, _urgent
        if all(signal.getsignal(sig) in (signal.SIG_DFL, None) for sig in self.SIGNALS):
            _reason, _signal_name, _signal_at, _urgent = None, None, None, False
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, None):
                self._previous[sig] = current
                signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install()`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        self._previous.clear()

    @staticmethod
    def _handle(signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        _record(signum)


def watch() -> Watch:
    """Install flag-only handlers where no Guard owns the signals; returns the handle to uninstall."""
    return Watch().install()


def requested_everywhere() -> bool:
    """`requested()` on any rank, agreed by all ranks (a collective: every rank must call it together).

    Without an initialised process group this is `requested()`.
    """
    local = requested()
    dist = sys.modules.get("torch.distributed")
    # No process group can exist before torch.distributed was imported (and importing it is slow).
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return local
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def process_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, else SLURM_PROCID, else 0)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class Guard:
    """Installs the signal handlers for one stage run and decides when to requeue.

    `requeue` is called at most once, on every rank (it must itself do nothing on ranks other than 0,
    and may end the process). It runs in the signal handler for a stage that never polled, in a timer
    thread when a polling stage overruns `grace_s`, or from `finish_preempted()` after it stopped.
    """

    def __init__(self, requeue: Callable[[], None], grace_s: float, cooperative: bool = False) -> None:
        self._requeue = requeue
        self._grace_s = grace_s
        self._cooperative = cooperative  # the stage is known to poll, even before its first poll
        self._timer: threading.Timer | None = None
        self._requeued = False
        self._finishing = False
        self._previous: dict[int, object] = {}

    def install(self) -> "Guard":
        """Take over SIGUSR1, SIGUSR2 and SIGTERM (call from the main thread)."""
        global _reason, _polled, _signal_name, _signal_at, _urgent, _grace_s
        _reason, _polled, _signal_name, _signal_at, _urgent, _grace_s = None, False, None, None, False, self._grace_s
        for sig in (*REQUEUE_SIGNALS, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self, work_done: bool = False) -> None:
        """Cancel a pending forced requeue and restore the previous handlers.

        With `work_done` (the stage completed), requeue signals are ignored from now on instead:
        a time-limit signal that comes while the finished job exits must neither requeue it (the
        previous handler, submitit's, would) nor kill it (the default action, which would fail a
        completed job and cancel the jobs that wait for it).
        """
        global _grace_s
        _grace_s = None
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            if work_done and sig in REQUEUE_SIGNALS:
                handler = signal.SIG_IGN
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def requeue_once(self) -> None:
        """Run the requeue callback unless it already ran."""
        with _lock:
            if self._requeued:
                return
            self._requeued = True
        if self._timer is not None:
            self._timer.cancel()
        self._requeue()

    def finish_preempted(self) -> None:
        """After the stage raised Preempted: requeue if a requeue signal came, then end the process."""
        self._finishing = True
        if _reason == "requeue":
            self.requeue_once()
            if process_rank() != 0:
                # Rank 0 requeues the job, which ends every task. Exiting first could make SLURM
                # (KillOnBadExit) kill rank 0 before it gets there, and the job would fail instead.
                deadline = time.monotonic() + self._grace_s + 60
                while time.monotonic() < deadline:
                    time.sleep(1)
        # A stage that stopped early did not finish: never let a dependent job start.
        sys.exit(143)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        if signum in REQUEUE_SIGNALS:
            first = _reason != "requeue"
            _record(signum)
            print(f"[preemption] rank {process_rank()}: {name}: checkpoint and requeue", file=sys.stderr, flush=True)
            if not _polled and not self._cooperative:
                print(f"[preemption] rank {process_rank()}: this stage does not poll for signals: requeueing at once; "
                      "it resumes from its latest periodic checkpoint", file=sys.stderr, flush=True)
                self.requeue_once()
            elif first:
                if not _polled:
                    print(f"[preemption] rank {process_rank()}: {name} arrived during start-up: the stage checkpoints "
                          f"after its first steps and stops (requeue forced after {self._grace_s:.0f}s)",
                          file=sys.stderr, flush=True)
                self._timer = threading.Timer(self._grace_s, self._overrun)
                self._timer.daemon = True
                self._timer.start()
            return
        # SIGTERM
        _record(signum)
        print(f"[preemption] rank {process_rank()}: {name}", file=sys.stderr, flush=True)
        if not _polled or self._finishing:
            raise SystemExit(143)

    def _overrun(self) -> None:
        started = "" if _polled else " (it was still starting up: it never reached a step)"
        print(f"[preemption] rank {process_rank()}: the stage did not checkpoint and stop within {self._grace_s:.0f}s "
              f"of the signal{started}: requeueing now without a new checkpoint; it resumes from its latest one. "
              "If this repeats, the job's time limit leaves too little time after start-up: raise time_min or "
              "signal_delay_s / preempt_grace_s in the cluster profile", file=sys.stderr, flush=True)
        self.requeue_once()
