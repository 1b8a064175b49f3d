"""Exponential moving averages of the model weights, one per rate, kept in float32.

Each EMA mirrors the tensors the strategy trains on this rank: the whole parameter under DDP and
DeepSpeed ZeRO-1/2, the local shard under FSDP2 (the EMA tensor is a DTensor with the parameter's
placement, so it is saved and resharded by torch.distributed.checkpoint like the parameter) and the
local partition under ZeRO-3. The trainer calls `update()` once per optimizer step (not on
accumulation micro-steps) with whether the step was applied, a device flag: a skipped fp16
overflow step leaves the EMA unchanged without the host reading the flag.
"""
from __future__ import annotations

import torch


def ema_name(rate: float) -> str:
    """The key of an EMA in checkpoints and exports: the rate, e.g. "0.9999"."""
    return format(float(rate), ".10g")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """EMAs at several rates of a dict of named tensors (`sources`, the params the strategy owns)."""

    def __init__(self, sources: dict[str, torch.Tensor], rates: tuple[float, ...]):
        self.rates = tuple(float(r) for r in rates)
        self.names = [ema_name(r) for r in self.rates]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"EMA rates must be distinct, got {self.rates}")
        self.param_names = list(sources)
        with torch.no_grad():
            self.shadows = {
                name: {k: v.detach().to(torch.float32).clone() for k, v in sources.items()}
                for name in self.names
            }

    def __bool__(self) -> bool:
        return bool(self.rates)

    @torch.no_grad()
    def update(self, sources: dict[str, torch.Tensor], applied: torch.Tensor | None = None) -> None:
        """shadow <- rate * shadow + (1 - rate) * source, for every rate.

        `applied` (a 0-d device tensor, 1 or 0) is whether the optimizer step was applied: a
        skipped step leaves the EMA as it is, decided on the device without reading the flag.
        """
        if not self.rates:
            return
        src = [_local(sources[k]) for k in self.param_names]
        if src and src[0].dtype != torch.float32:
            src = [s.float() for s in src]
        for name, rate in zip(self.names, self.rates):
            dst = [_local(self.shadows[name][k]) for k in self.param_names]
            if applied is None:
                torch._foreach_lerp_(dst, src, 1.0 - rate)
            else:
                weight = applied.to(device=dst[0].device, dtype=torch.float32) * (1.0 - rate)
                torch._foreach_lerp_(dst, src, [weight] * len(dst))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """{ema name: {parameter name: tensor}} (the live tensors: DCP saves and loads in place)."""
        return self.shadows

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy saved EMA tensors in (same names, shapes and rates)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"checkpoint has no EMA at rate(s) {missing}; it holds {sorted(state)}")
        for name in self.names:
            for k in self.param_names:
                _local(self.shadows[name][k]).copy_(_local(state[name][k]))
