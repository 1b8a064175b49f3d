"""Mixed precision: autocast contexts, the hardware check, and fp16 dynamic loss scaling.

Parameters, optimizer state and EMA stay float32 in every mode; bf16/fp16 only change the dtype of
the forward/backward arithmetic (torch autocast). fp16 needs loss scaling because small gradients
underflow in half precision; the scaler below is the usual dynamic one with two guards the original
ADM code lacked: a floor under which the scale never drops, and an error after `max_nonfinite` steps
in a row whose gradients were not finite (a diverged run stops instead of skipping steps forever).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_supported(precision: str, device: torch.device, allow_slow: bool = False) -> None:
    """Raise a ValueError when `precision` is not natively supported by `device`.

    On CPUs, bf16/fp16 autocast runs on every machine but is emulated (tens to hundreds of times
    slower than fp32) unless the CPU has native instructions (AVX512-BF16/AMX, AVX512-FP16);
    `allow_slow=True` runs anyway.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(DTYPES)}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"{name} has no bf16 support; use precision=fp16 (dynamic loss scaling) or fp32")
        return
    if device.type == "cpu":
        native = {
            "bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
            "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported,
        }[precision]()
        if not native and not allow_slow:
            raise ValueError(
                f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {precision} arithmetic: "
                f"{precision} autocast would be far slower than fp32. Use precision=fp32, or set "
                f"allow_slow_precision=true to run it anyway")
        return
    raise ValueError(f"precision={precision} is not supported on device type {device.type!r}; use fp32")


def autocast(precision: str, device: torch.device):
    """The forward-pass context of a precision mode (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite gradients for too many steps in a row."""


class LossScaler:
    """Dynamic loss scaling for fp16, and the non-finite-step guard for every precision.

    Use: `loss * scaler.scale` for backward; then `ok = scaler.unscale_and_check(params)` divides the
    gradients by the scale and agrees across ranks whether all of them are finite; then
    `scaler.update(ok)` (raises NonFiniteLossError after `max_nonfinite` bad steps in a row).
    With `dynamic=False` the scale stays 1 and only the guard is active.
    """

    def __init__(self, dynamic: bool, init_scale: float = 2.0 ** 16, floor: float = 1.0,
                 growth_interval: int = 1000, max_nonfinite: int = 50):
        self.dynamic = dynamic
        self.scale = float(init_scale) if dynamic else 1.0
        self.floor = float(floor)
        self.growth_interval = int(growth_interval)
        self.max_nonfinite = int(max_nonfinite)
        self.good_steps = 0  # finite steps since the last change of scale
        self.bad_in_a_row = 0
        self.skipped_total = 0

    @torch.no_grad()
    def unscale_and_check(self, params) -> bool:
        """Divide gradients by the scale in place; True when every rank's gradients are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if self.scale != 1.0 and local:
            torch._foreach_mul_(local, 1.0 / self.scale)
        if local:
            norms = torch._foreach_norm(local)
            finite = torch.isfinite(torch.stack(norms).sum()).float()
        else:
            finite = torch.ones(())
        if dist.is_available() and dist.is_initialized():
            device = local[0].device if local else torch.device("cpu")
            finite = finite.to(device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def update(self, finite: bool) -> None:
        """Adjust the scale after a step (halve on overflow, double after a clean window)."""
        if finite:
            self.bad_in_a_row = 0
            self.good_steps += 1
            if self.dynamic and self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
            return
        self.bad_in_a_row += 1
        self.skipped_total += 1
        self.good_steps = 0
        if self.dynamic:
            self.scale = max(self.scale / 2.0, self.floor)
        if self.bad_in_a_row >= self.max_nonfinite:
            hint = (f" The loss scale is at its floor ({self.floor:g})." if self.dynamic and self.scale <= self.floor else "")
            raise NonFiniteLossError(
                f"{self.bad_in_a_row} optimizer steps in a row had non-finite gradients; training diverged.{hint} "
                "Lower lr, enable grad_clip, or use precision=bf16/fp32; resume from the last checkpoint.")

    def state_dict(self) -> dict:
        """Everything needed to continue with the same scale after a resume."""
        return {"scale": self.scale, "good_steps": self.good_steps, "bad_in_a_row": self.bad_in_a_row,
                "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values."""
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.skipped_total = int(state.get("skipped_total", 0))


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients over all ranks (sharded DTensor gradients are reduced)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def clip_grads_(params, max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients so their global norm is at most `max_norm` (given the precomputed norm)."""
    if max_norm <= 0 or not math.isfinite(float(norm)):
        return
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coef)
