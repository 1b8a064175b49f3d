"""Per-sample randomness: each sample index draws its noise from its own generator."""
from __future__ import annotations

from typing import Sequence

import torch



class PerSampleNoise:
    """A `step_noise` callable that draws each sample's noise from that sample's own generator.

    `PerSampleNoise(seeds)` holds one CPU `torch.Generator` per sample (seeded with `seeds[i]`);
    calling it with a batch tensor `like` returns standard normal noise shaped like `like`, row i
    drawn from generator i, on `like`'s device and dtype. Rows are therefore independent of the
    batch size and of the device: splitting a batch gives the same numbers. Pass it as
    `step_noise=` to the sampling loops and use `.initial(shape)` (or call it) for x_T.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(int(seed))
            self.generators.append(generator)

    def __len__(self) -> int:
        return len(self.generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(
                f"PerSampleNoise holds {len(self.generators)} generators but the batch has "
                f"{like.shape[0]} samples; build it with one seed per sample"
            )
        rows = [
            torch.randn(tuple(like.shape[1:]), generator=g, dtype=torch.float32)
            for g in self.generators
        ]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    def initial(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        """x_T for a batch of `shape`, drawn from the per-sample generators."""
        return self(torch.empty(tuple(shape), device=device or "cpu", dtype=dtype))


def loop_device(model, noise, device) -> torch.device:
    """Where a sampling loop runs: `device` if given, else x_T's, else the model's first parameter's, else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")
