"""Mixed precision: autocast contexts, the hardware check, and fp16 dynamic loss scaling.

Parameters, optimizer state and EMA stay float32 in every mode; bf16/fp16 only change the dtype of
the forward/backward arithmetic (torch autocast). fp16 needs loss scaling because small gradients
underflow in half precision; the scaler below is the usual dynamic one with two guards the original
ADM code lacked: a floor under which the scale never drops, and an error after `max_nonfinite` steps
in a row whose gradients were not finite (a diverged run stops instead of skipping steps forever).
Its state lives on the device and `apply_optimizer_step` unscales, clips and skips inside the fused
optimizer, so a training step never waits for the device; the guard is read at log steps.
"""
from __future__ import annotations

import contextlib

import torch

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

    Everything a step changes lives in device tensors, so a step never waits for the device:

        backward(loss * scaler.scale_tensor / grad_accum)
        found_inf = 1.0 where the step's gradients are not finite (a device tensor; the strategy
                    skips the optimizer update on the device, see `apply_optimizer_step`)
        scaler.update(found_inf)     # halve on overflow (not below the floor), double after a clean window
        ...
        scaler.check()               # every log step and before a checkpoint: reads the counters and
                                     # raises NonFiniteLossError after `max_nonfinite` bad steps in a row

    A run of bad steps is remembered until the next `check()`, so it is caught even when good
    steps follow it before the check. With `dynamic=False` the scale stays 1 and only the guard is
    active. Reading `scale` or `skipped_total` waits for the device (logging only).
    """

    def __init__(self, dynamic: bool, init_scale: float = 2.0 ** 16, floor: float = 1.0,
                 growth_interval: int = 1000, max_nonfinite: int = 50, device: torch.device | str = "cpu"):
        self.dynamic = dynamic
        self.floor = float(floor)
        self.growth_interval = int(growth_interval)
        self.max_nonfinite = int(max_nonfinite)
        device = torch.device(device)
        self.scale_tensor = torch.full((), float(init_scale) if dynamic else 1.0, dtype=torch.float32, device=device)
        # int32: the layout torch._amp_update_scale_ expects for its growth tracker.
        self._good_steps = torch.zeros((), dtype=torch.int32, device=device)  # finite steps since the last change
        self._bad_in_a_row = torch.zeros((), dtype=torch.int32, device=device)
        self._worst_run = torch.zeros((), dtype=torch.int32, device=device)  # longest bad run since check()
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def scale(self) -> float:
        """The current loss scale (reads the device)."""
        return float(self.scale_tensor)

    @property
    def skipped_total(self) -> int:
        """Optimizer steps skipped so far because their gradients were not finite (reads the device)."""
        return int(self._skipped)

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        """Record a step: `found_inf` is a 0-d float tensor, 1 when its gradients were not finite."""
        found_inf = found_inf.to(device=self.scale_tensor.device, dtype=torch.float32)
        bad = found_inf.to(torch.int32)
        if self.dynamic:
            torch._amp_update_scale_(self.scale_tensor, self._good_steps, found_inf, 2.0, 0.5, self.growth_interval)
            self.scale_tensor.clamp_(min=self.floor)
        else:
            self._good_steps.add_(1).mul_(1 - bad)
        self._bad_in_a_row.add_(bad).mul_(bad)
        torch.maximum(self._worst_run, self._bad_in_a_row, out=self._worst_run)
        self._skipped.add_(bad)

    def check(self) -> None:
        """Raise NonFiniteLossError when `max_nonfinite` steps in a row were skipped since the last check.

        Reads the device: call it where the loop synchronises anyway (logging, checkpoints).
        """
        worst = int(self._worst_run)
        self._worst_run.copy_(self._bad_in_a_row)
        if worst >= self.max_nonfinite:
            scale = self.scale
            at_floor = self.dynamic and scale <= self.floor
            hint = f" The loss scale is at its floor ({self.floor:g})." if at_floor else ""
            raise NonFiniteLossError(
                f"{worst} optimizer steps in a row had non-finite gradients; training diverged.{hint} "
                "Lower lr, enable grad_clip, or use precision=bf16/fp32; resume from the last checkpoint.")

    def state_dict(self) -> dict:
        """Everything needed to continue with the same scale after a resume (reads the device)."""
        return {"scale": self.scale, "good_steps": int(self._good_steps), "bad_in_a_row": int(self._bad_in_a_row),
                "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values."""
        self.scale_tensor.fill_(float(state["scale"]))
        self._good_steps.fill_(int(state["good_steps"]))
        self._bad_in_a_row.fill_(int(state["bad_in_a_row"]))
        self._worst_run.fill_(int(state["bad_in_a_row"]))
        self._skipped.fill_(int(state.get("skipped_total", 0)))


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients over all ranks (sharded DTensor gradients are reduced).

    A device tensor; inf or nan when any gradient on any rank is not finite.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can unscale and skip on the device (torch's fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


@torch.no_grad()
def apply_optimizer_step(optimizer: torch.optim.Optimizer, params, scale: torch.Tensor, grad_clip: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, check, clip and apply the gradients without waiting for the device.

    The gradients hold `scale` x the true ones. Their global norm (one pass, all ranks) gives both
    the finiteness check and the clipping coefficient; a fused optimizer then divides each gradient
    by `scale / clip` and skips the whole update when `found_inf` is set, all inside its kernel
    (what torch.amp.GradScaler does for fused optimizers). Returns (found_inf as a 0-d float
    tensor, the true gradient norm); both stay on the device.
    """
    norm = grad_norm(params) / scale
    found_inf = (~torch.isfinite(norm)).float()
    divisor = scale
    if grad_clip > 0:
        divisor = scale / torch.clamp(grad_clip / (norm + 1e-6), max=1.0)
    if supports_device_skip(optimizer):
        optimizer.grad_scale, optimizer.found_inf = divisor, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return found_inf, norm
    # Another optimizer cannot skip on the device: one read of the flag per step.
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not bool(found_inf):
        torch._foreach_div_(grads, divisor)
        optimizer.step()
    return found_inf, norm
