"""Gaussian diffusion (ADM): schedules, respacing, training losses and samplers."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DiffusionConfig:
    """Configuration of a diffusion process; `.build()` returns the process object."""

    steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    predict_xstart: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    timestep_respacing: str = ""

    def build(self):
        """Build the diffusion object described by this config."""
        return create_diffusion(**asdict(self))


def create_diffusion(
    steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    learn_sigma=True,
    predict_xstart=False,
    sigma_small=False,
    use_kl=False,
    rescale_learned_sigmas=False,
):
    """Build a (possibly respaced) Gaussian diffusion process. Filled in below."""
    raise NotImplementedError("create_diffusion is being written")
