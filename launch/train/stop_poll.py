"""When the ranks of a training run agree to stop for a preemption or time-limit signal.

runtime.preemption's signal handlers only set a host-side flag, which costs nothing to read. Agreeing
on it across ranks takes a collective and a wait for its result, which a steady-state step must not
pay; yet every rank must stop after the same step. So the ranks agree only at *check steps*:

- every step of a single process (no collective is needed there);
- every checkpoint step (the checkpoint is a collective anyway) and the first step of a run;
- otherwise every `preempt_check_every` steps (default 10), fewer when steps are slow, so that
  checks are at most `CHECK_INTERVAL_S` seconds apart (a 30 s step is checked every step).

The interval to the next check is agreed in the same all-reduce (the smallest any rank asks for),
so all ranks meet at the same steps. A signal is acted on at the next check step: within
`preempt_check_every` steps or about `CHECK_INTERVAL_S` seconds, well inside SLURM's signal delay.

After a requeue (time-limit) signal under a Guard, `time_to_spare()` tells the trainer whether all
ranks still have time to train on before the Guard's forced requeue (see Trainer.fit).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from runtime import preemption

CHECK_INTERVAL_S = 10.0
_CODES = {None: 0, "requeue": 1, "stop": 2}
_REASONS = {code: reason for reason, code in _CODES.items()}


def _process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StopPoll:
    """Decides at which steps the ranks agree on a stop signal, and agrees on it (see module doc)."""

    def __init__(self, every: int, device: torch.device, interval_s: float = CHECK_INTERVAL_S):
        self.every = max(1, int(every))
        self.interval_s = float(interval_s)
        self.device = device
        self._next: int | None = None  # None: check after the first step
        self._mark: tuple[int, float] | None = None  # (step, time) of the last check
        self.seconds_between_checks = 0.0  # measured between the last two checks
        # Marks this stage as one that polls: a signal now waits for the next check (runtime.preemption).
        preemption.requested()

    def due(self, step: int, boundary: bool) -> bool:
        """Whether the ranks agree after `step` (`boundary`: a checkpoint is written after it anyway)."""
        return boundary or self._next is None or step >= self._next or not _process_group()

    def agree(self, step: int) -> str | None:
        """The agreed request after `step`: None, "requeue" (SIGUSR1/2) or "stop" (SIGTERM). A collective."""
        now = time.monotonic()
        interval = 1
        if self._mark is not None and step > self._mark[0]:
            self.seconds_between_checks = now - self._mark[1]
            per_step = max(self.seconds_between_checks / (step - self._mark[0]), 1e-9)
            interval = max(1, min(self.every, math.floor(self.interval_s / per_step)))
        code = _CODES[preemption.reason() if preemption.requested() else None]
        if _process_group():
            # One MAX all-reduce: the strongest request of any rank, the shortest interval any rank wants.
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            packed = torch.tensor([code, -interval], dtype=torch.int64, device=device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
            code, interval = (int(v) for v in packed.tolist())
            interval = -interval
        self._next = step + interval
        self._mark = (step, time.monotonic())
        return _REASONS[code]

    def time_to_spare(self, reserve_s: float) -> bool:
        """After an agreed requeue signal: whether every rank has more than `reserve_s` seconds (the
        largest any rank asks for) before its Guard forces the requeue. A collective.

        False when a rank knows no deadline (no Guard: torchrun or a plain process).
        """
        deadline = preemption.requeue_deadline()
        left = deadline - time.monotonic() if deadline is not None else 0.0
        if _process_group():
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            packed = torch.tensor([-round(left * 1000), round(reserve_s * 1000)], dtype=torch.int64, device=device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
            neg_left, reserve_ms = packed.tolist()
            left, reserve_s = -neg_left / 1000, reserve_ms / 1000
        return left > reserve_s


__all__ = ["StopPoll", "CHECK_INTERVAL_S"]
