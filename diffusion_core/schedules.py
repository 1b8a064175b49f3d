"""Noise schedules and timestep respacing, exactly as ADM computes them (float64 numpy)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine")
# The original clamps cosine betas here so the last step cannot destroy all signal at once.
_COSINE_MAX_BETA = 0.999



def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Return the float64 betas of the "linear" or "cosine" schedule with `num_timesteps` steps.

    linear: evenly spaced from 1e-4 * 1000/T to 0.02 * 1000/T (so any T has the same endpoints
    in continuous time). cosine: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) with
    abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2.
    """
    if name == "linear":
        if num_timesteps <= 20:
            # beta_max = 0.02 * 1000 / T reaches 1 at T = 20: x_T would carry no signal at all.
            raise ValueError(
                f"the linear schedule needs steps > 20 (its last beta is 20/steps), got {num_timesteps}; "
                f"use more steps or noise_schedule='cosine'"
            )
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1.0 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), _COSINE_MAX_BETA)
            for i in range(num_timesteps)
        ]
        return np.array(betas, dtype=np.float64)
    raise ValueError(
        f"unknown noise_schedule {name!r}; choose one of {', '.join(NOISE_SCHEDULES)}"
    )


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> list[int]:
    """Return the sorted original timesteps kept by a respacing spec.

    Syntaxes:
    - "" (or None): keep all `num_timesteps`.
    - "ddimN": the smallest integer stride s with len(range(0, T, s)) == N; keeps 0, s, 2s, ...
    - "a,b,c" / "250" / a sequence of ints: split [0, T) into that many sections of equal size
      (the first T % n sections one longer) and keep `count` evenly spaced points in each,
      including both ends of the section. The position is a float64 running sum of the stride
      (size-1)/(count-1) rounded with Python's round (ties to even), which is exactly what the
      original does (at strides that are not binary fractions the running sum decides ties).
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return list(range(num_timesteps))
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"timestep_respacing {spec!r}: expected 'ddimN' with an integer N, e.g. 'ddim25'"
                ) from None
            if desired < 1:
                raise ValueError(f"timestep_respacing {spec!r}: N must be >= 1")
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {spec!r}: no integer stride gives exactly {desired} steps out of "
                f"{num_timesteps}; choose another N (e.g. a divisor of {num_timesteps}) or use "
                f"'{desired}' for evenly spaced steps"
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {spec!r}: expected '', 'ddimN', or comma-separated integers "
                f"such as '250' or '10,10,10'"
            ) from None
    else:
        counts = [int(c) for c in spec]
    if not counts:
        raise ValueError(f"timestep_respacing {spec!r}: no section counts given")
    if len(counts) > num_timesteps:
        raise ValueError(
            f"timestep_respacing {spec!r}: {len(counts)} sections but only {num_timesteps} steps"
        )
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1:
            raise ValueError(
                f"timestep_respacing {spec!r}: section {i} asks for {count} steps; each count must be >= 1"
            )
        if count > size:
            raise ValueError(
                f"timestep_respacing {spec!r}: section {i} has {size} steps of the {num_timesteps}-step "
                f"process but asks for {count}; use at most {size} per section"
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))
