"""The choices that several commands and jobs share, in one place (no torch import: `adm X --help` stays quick)."""
from __future__ import annotations

import re

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
SAMPLERS = ("ddpm", "ddim", "dpm++")
# The DPM-Solver++ time grids; diffusion_core.dpm_solver.SKIP_TYPES (tests hold the two equal).
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
DPM_SOLVER_STEPS_FORMS = "dpm++2m-N (second order, DPM-Solver++(2M)) or dpm++1-N (first order), N evaluations"
_DPM_SOLVER_STEPS = re.compile(r"dpm\+\+(1|2m)-([1-9][0-9]{0,5})")


def default_sampler(steps) -> str:
    """The sampler a steps string implies: "dpm++" for "dpm++2m-N" / "dpm++1-N", "ddim" for "ddimN",
    else "ddpm" (as the original's flags). The one place that maps a steps string to a sampler."""
    text = str(steps)
    if text.startswith("dpm"):
        return "dpm++"
    return "ddim" if text.startswith("ddim") else "ddpm"


def dpm_solver_steps(steps) -> tuple[int, int]:
    """(order, evaluations) of a DPM-Solver++ steps string: "dpm++2m-20" -> (2, 20), "dpm++1-10" -> (1, 10).

    Anything else is a ValueError naming the forms.
    """
    match = _DPM_SOLVER_STEPS.fullmatch(str(steps).strip())
    if match is None:
        raise ValueError(f"steps {str(steps)!r} is not a DPM-Solver++ steps string: use {DPM_SOLVER_STEPS_FORMS}, "
                         "e.g. dpm++2m-20")
    return (1 if match.group(1) == "1" else 2), int(match.group(2))
