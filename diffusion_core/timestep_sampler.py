"""Timestep samplers for training: uniform, and ADM's loss-second-moment importance sampler.

Both return `(t, weights)` where the loss of sample i is to be multiplied by weights[i]; the
weights 1 / (T p_t) keep the weighted loss an unbiased estimate of the uniform-t loss.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch


class TimestepSampler:
    """Base class: a distribution over timesteps given by `weights()` (unnormalised)."""

    kind = "base"

    def __init__(self, num_timesteps: int):
        if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised float64 sampling weights, one per timestep."""
        raise NotImplementedError

    def probabilities(self) -> np.ndarray:
        """The normalised sampling distribution p_t."""
        w = self.weights()
        return w / w.sum()

    def sample(self, batch_size: int, device="cpu", generator: Optional[torch.Generator] = None):
        """Draw `batch_size` timesteps; return (t int64 [B], importance weights float32 [B]) on `device`.

        `generator` (a torch.Generator) makes the draw reproducible; the draw happens on the
        generator's device.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = torch.from_numpy(self.probabilities())
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(draw_device), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p.to(draw_device)[t])
        return t.to(device=device, dtype=torch.long), weights.to(device=device, dtype=torch.float32)

    def update_with_all_losses(self, ts, losses) -> None:
        """Record per-sample losses gathered from all ranks (no-op for fixed samplers)."""

    def state_dict(self) -> dict:
        """State needed to resume sampling exactly (tensors only; safe for weights_only loads)."""
        return {"num_timesteps": torch.tensor(self.num_timesteps)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; raises ValueError if it belongs to a different sampler."""
        saved = int(state.get("num_timesteps", -1))
        if saved != self.num_timesteps:
            raise ValueError(
                f"timestep sampler state is for {saved} timesteps but this sampler has {self.num_timesteps}"
            )


class UniformSampler(TimestepSampler):
    """t uniform over [0, T); all weights 1."""

    kind = "uniform"

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, device="cpu", generator: Optional[torch.Generator] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device=device, dtype=torch.long), torch.ones(batch_size, dtype=torch.float32, device=device)


class LossSecondMomentSampler(TimestepSampler):
    """ADM's importance sampler: p_t proportional to sqrt(E[loss_t^2]) over the last losses.

    Keeps the last `history_per_term` (10) losses of every t; samples uniformly until every t
    has a full history, then mixes in `uniform_prob` (0.1%) of the uniform distribution so no
    timestep is ever starved.
    """

    kind = "loss-second-moment"

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self._counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        """True once every timestep has a full history."""
        return bool((self._counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._history**2, axis=-1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts, losses) -> None:
        """Append each (t, loss) pair to t's history, dropping the oldest once it is full."""
        ts = np.asarray(torch.as_tensor(ts).detach().cpu().reshape(-1), dtype=np.int64)
        losses = np.asarray(torch.as_tensor(losses).detach().cpu().double().reshape(-1), dtype=np.float64)
        if ts.shape != losses.shape:
            raise ValueError(f"got {ts.size} timesteps but {losses.size} losses; pass one loss per timestep")
        if ts.size and (ts.min() < 0 or ts.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps out of range: values in [{ts.min()}, {ts.max()}], valid 0..{self.num_timesteps - 1}"
            )
        for t, loss in zip(ts.tolist(), losses.tolist()):
            if self._counts[t] == self.history_per_term:
                self._history[t, :-1] = self._history[t, 1:]
                self._history[t, -1] = loss
            else:
                self._history[t, self._counts[t]] = loss
                self._counts[t] += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["history"] = torch.from_numpy(self._history.copy())
        state["counts"] = torch.from_numpy(self._counts.copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        history = torch.as_tensor(state["history"]).double().numpy()
        counts = torch.as_tensor(state["counts"]).long().numpy()
        if history.shape != self._history.shape or counts.shape != self._counts.shape:
            raise ValueError(
                f"timestep sampler state has history {history.shape} / counts {counts.shape}; this "
                f"sampler expects {self._history.shape} / {self._counts.shape} (different "
                f"history_per_term or num_timesteps)"
            )
        self._history = history.copy()
        self._counts = counts.copy()


SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion_or_steps: Union[int, object]) -> TimestepSampler:
    """Build a timestep sampler by name ("uniform" | "loss-second-moment").

    The second argument is a diffusion object (its `num_timesteps` is used) or a step count.
    """
    steps = getattr(diffusion_or_steps, "num_timesteps", diffusion_or_steps)
    if name == "uniform":
        return UniformSampler(steps)
    if name in ("loss-second-moment", "loss_second_moment"):
        return LossSecondMomentSampler(steps)
    raise ValueError(f"unknown timestep sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
