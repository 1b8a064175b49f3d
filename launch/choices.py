"""The choices that several commands and jobs share, in one place (no torch import: `adm X --help` stays quick)."""
from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
SAMPLERS = ("ddpm", "ddim")


def default_sampler(steps) -> str:
    """The sampler a respacing string implies: "ddim" for "ddimN", else "ddpm" (as the original's flags)."""
    return "ddim" if str(steps).startswith("ddim") else "ddpm"
