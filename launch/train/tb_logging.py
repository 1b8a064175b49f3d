"""What a training run reports: TensorBoard scalars and images, RUN/log.txt, a progress bar.

Rank 0 writes; every rank contributes to the averaged metrics through `MetricWindow.reduce()`.
Per-sample metrics (loss, mse, vb, accuracies) are averaged overall and per timestep quartile
(q0 = t in [0, T/4), ..., q3), as ADM logged them.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class MetricWindow:
    """Sums of per-sample metrics since the last log, overall and per timestep quartile.

    The sums live on the training device and `add()` only queues device work (no `.item()`, no
    one_hot, whose CPU range check reads the values back), so it never waits for the GPU;
    `reduce()` (once per log step) does.
    """

    def __init__(self, names: tuple[str, ...], num_timesteps: int, device: torch.device | str = "cpu"):
        self.names = tuple(names)
        self.num_timesteps = num_timesteps
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        # rows: metric; columns: overall, q0..q3. counts: overall, q0..q3.
        self.sums = torch.zeros(len(self.names), 5, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(5, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def add(self, t: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch: timesteps `t` [B] and per-sample `values[name]` [B]."""
        t = t.detach().to(self.device)
        quart = torch.clamp((4 * t) // self.num_timesteps, 0, 3)
        onehot = (quart[:, None] == torch.arange(4, device=self.device)).double()  # [B, 4]
        mat = torch.stack([values[n].detach().to(self.device, torch.float64) for n in self.names])  # [M, B]
        self.sums[:, 0] += mat.sum(1)
        self.sums[:, 1:] += mat @ onehot
        self.counts[0] += t.numel()
        self.counts[1:] += onehot.sum(0)

    def reduce(self, device: torch.device | None = None) -> dict[str, float]:
        """Average over all ranks (a collective) -> {"loss": .., "loss_q0": .., ...}; then reset."""
        packed = torch.cat([self.sums.flatten(), self.counts])
        if device is not None:
            packed = packed.to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        packed = packed.cpu()
        sums = packed[: self.sums.numel()].view(self.sums.shape)
        counts = packed[self.sums.numel():]
        out = {}
        for i, name in enumerate(self.names):
            if counts[0] > 0:
                out[name] = float(sums[i, 0] / counts[0])
            for q in range(4):
                if counts[q + 1] > 0:
                    out[f"{name}_q{q}"] = float(sums[i, q + 1] / counts[q + 1])
        self.reset()
        return out


class RunLogger:
    """TensorBoard + log.txt + tqdm for one run; a no-op on ranks other than 0 (except `line`)."""

    def __init__(self, run_dir: str | Path, rank: int, start_step: int, total_steps: int, progress: bool = True):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint, so a resumed
        # run's curves do not hold two values for the same step.
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._log = open(self.run_dir / "log.txt", "a", buffering=1)  # append-only, line-buffered
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        """A timestamped line in log.txt and on stdout (rank 0 only)."""
        if self.rank != 0:
            return
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        msg = f"[{stamp}] {text}"
        self._log.write(msg + "\n")
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """One TensorBoard scalar per entry, under `prefix/`."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, step: int, grid_hwc: np.ndarray) -> None:
        """A uint8 [H, W, 3] image in TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, grid_hwc, step, dataformats="HWC")

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def flush(self) -> None:
        """Make everything written so far visible to readers (TensorBoard, tail -f)."""
        if self.writer is not None:
            self.writer.flush()
            self._log.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self.writer is not None:
            self.writer.close()
            self._log.close()
        if self.bar is not None:
            self.bar.close()


def format_metrics(step: int, values: dict[str, float], keys: tuple[str, ...]) -> str:
    """`step 120 | loss 0.1234 | ...` for log.txt (only `keys`, in order, when present)."""
    parts = [f"step {step}"]
    for key in keys:
        if key in values:
            value = values[key]
            parts.append(f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.3e}")
    return " | ".join(parts)


def image_grid(images: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """[N, 3, H, W] floats in [-1, 1] -> one uint8 [rows*H, ncol*W, 3] grid (ADM's rounding)."""
    n, c, h, w = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    arr = ((images.float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = arr[i]
    return grid
