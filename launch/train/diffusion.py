"""`adm train`: ADM diffusion training with the hybrid loss (ADM_SPEC section 4).

Per micro-batch: draw t (uniform, or ADM's loss-second-moment importance sampler), noise the
images with q_sample, and minimise mse(eps) + vb (the vb term trains only the variance channels).
Logged: loss, mse, vb overall and per timestep quartile; a periodic grid of EMA samples (DDIM).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from runtime.files import atomic_write_bytes
from diffusion_core.diffusion import PerSampleNoise
from diffusion_core.timestep_sampler import create_named_schedule_sampler
from launch.train import loop as train_loop
from launch.train.config import DiffusionTrainConfig, resolve
from launch.precision import autocast
from launch.train.tb_logging import image_grid


class DiffusionObjective:
    """What `Trainer` needs to train a diffusion UNet (or an upsampler)."""

    metric_names = ("loss", "mse", "vb")
    log_keys = ("loss", "mse", "vb")

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.preset = trainer.preset
        self.device = trainer.device
        self.generator = trainer.generator
        # Training always uses the full chain; respacing is a sampling choice.
        self.diffusion = dataclasses.replace(self.preset.diffusion, timestep_respacing="").build()
        self.num_timesteps = self.diffusion.num_timesteps
        self.sampler = create_named_schedule_sampler(self.cfg.timestep_sampler, self.diffusion)
        model = self.preset.model
        self.num_classes = getattr(model, "num_classes", None)
        self.null_class = bool(getattr(model, "null_class", False))
        self.super_resolution = bool(getattr(model, "super_resolution", False))
        self.label_dropout = 0.1 if self.null_class else 0.0  # classifier-free guidance training
        self._sample_model = None

    # -- data ---------------------------------------------------------------------------------
    def make_loader(self, shards, batch_size: int, seed: int, train: bool = True):
        """ADM's centre crop + random flip (unless random_flip is off)."""
        from data.loader import ShardLoader

        info = self.trainer.info
        return ShardLoader(shards, image_size=self.preset.model.image_size, batch_size=batch_size,
                           rank=info.rank, world_size=info.world_size, num_workers=self.cfg.num_workers,
                           seed=seed, mode="center", flip=self.cfg.random_flip,
                           skip_bad_shards=self.cfg.skip_bad_shards)

    # -- the loss -----------------------------------------------------------------------------
    def model_kwargs(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        kwargs = {}
        if self.num_classes:
            y = labels
            if self.label_dropout:
                drop = torch.rand(y.shape, generator=self.generator, device=self.generator.device).to(y.device)
                y = torch.where(drop < self.label_dropout, torch.full_like(y, self.num_classes), y)
            kwargs["y"] = y
        if self.super_resolution:
            low = self.preset.model.low_res_size or images.shape[-1] // 4
            # The original upsampler training downsampled with area interpolation.
            kwargs["low_res"] = F.interpolate(images, size=(low, low), mode="area")
        return kwargs

    def losses(self, model_fn, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Hybrid loss of one micro-batch: {"loss" (scalar), "t", "metrics" (per-sample), "raw"}."""
        t, weights = self.sampler.sample(images.shape[0], device=images.device, generator=self.generator)
        noise = torch.randn(images.shape, generator=self.generator, device=self.generator.device).to(images.device)
        terms = self.diffusion.training_losses(model_fn, images, t, model_kwargs=self.model_kwargs(images, labels),
                                               noise=noise)
        loss = (terms["loss"] * weights).mean()
        return {"loss": loss, "t": t, "raw": terms["loss"].detach(),
                "metrics": {"loss": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}}

    def after_micro_step(self, out: dict) -> None:
        """Feed every rank's (t, loss) to the importance sampler (identical state on all ranks)."""
        if self.sampler.kind == "uniform":
            return
        ts = self.trainer.all_gather_cat(out["t"])
        losses = self.trainer.all_gather_cat(out["raw"].float())
        self.sampler.update_with_all_losses(ts, losses)

    def state_dict(self) -> dict:
        return {"timestep_sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["timestep_sampler"])

    # -- periodic EMA sample grid ---------------------------------------------------------------
    def periodic(self, step: int, final: bool) -> None:
        every = self.cfg.sample_every
        if every and (step % every == 0 or final) and not self.super_resolution:
            self.sample_grid(step)

    @torch.no_grad()
    def sample_grid(self, step: int) -> None:
        """DDIM samples of the EMA weights, the same noise and labels every time (rank 0 draws)."""
        weights = self.trainer.full_weights_for_sampling()  # collective
        if self.trainer.info.rank != 0:
            return
        if self._sample_model is None:
            # Built without initialisation: drawing random weights would move the training RNG.
            with torch.device("meta"):
                model = self.preset.build()
            self._sample_model = model.to_empty(device=self.device).eval()
        self._sample_model.load_state_dict(weights)
        count = self.cfg.sample_count
        ddim = dataclasses.replace(self.preset.diffusion, timestep_respacing=f"ddim{self.cfg.sample_steps}").build()
        noise = PerSampleNoise(range(count))
        shape = (count, self.preset.model.in_channels, self.preset.model.image_size, self.preset.model.image_size)
        x_T = noise.initial(shape, device=self.device)
        kwargs = {}
        if self.num_classes:
            kwargs["y"] = torch.arange(count, device=self.device) % self.num_classes
        model = self._sample_model

        def fn(x, t, **kw):
            with autocast(self.cfg.precision, self.device):
                return model(x, t, **kw).float()

        images = ddim.ddim_sample_loop(fn, shape, noise=x_T, model_kwargs=kwargs, device=self.device)
        grid = image_grid(images)
        self.trainer.logger.image("samples/ema", step, grid)
        from PIL import Image
        import io

        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        atomic_write_bytes(self.trainer.run_dir / "samples" / f"step_{step:09d}.png", buf.getvalue())


def train(cfg: DiffusionTrainConfig, run_dir: str | os.PathLike) -> int:
    """Train (or resume) a diffusion model into `run_dir`; returns the final step.

    `cfg` may be unresolved (preset recipe values still None). Launch with torchrun/srun for
    several processes. Raises `launch.train.loop.Preempted` after checkpointing on a stop signal.
    """
    cfg, preset = resolve(cfg)
    return train_loop.run(cfg, preset, run_dir, DiffusionObjective)
