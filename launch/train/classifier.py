"""`adm train-classifier`: the noisy classifier used for guidance (ADM_SPEC section 7).

Inputs are noised with q_sample at t uniform over the preset's diffusion schedule, after ADM's
random-crop + flip augmentation; plain cross-entropy; AdamW with linear decay to zero; no EMA by
default. Logged: loss, acc@1, acc@5 overall and per timestep quartile, for training batches and
(optionally) a validation set of shards.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.train import loop as train_loop
from launch.train.config import ClassifierTrainConfig, resolve
from launch.train.tb_logging import MetricWindow, format_metrics


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """{k: float tensor [B], 1 where the label is among the k highest logits}."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=1).float() for k in ks}


class ClassifierObjective:
    """What `Trainer` needs to train the noisy classifier."""

    metric_names = ("loss", "acc@1", "acc@5")
    log_keys = ("loss", "acc@1", "acc@5")

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.preset = trainer.preset
        self.generator = trainer.generator
        self.diffusion = dataclasses.replace(self.preset.diffusion, timestep_respacing="").build()
        self.num_timesteps = self.diffusion.num_timesteps

    def make_loader(self, shards, batch_size: int, seed: int, train: bool = True):
        """ADM's random crop (short side in [S, S/0.8]) + flip (unless random_flip is off) for training;
        centre crop for validation."""
        from data.loader import ShardLoader

        info = self.trainer.info
        return ShardLoader(shards, image_size=self.preset.model.image_size, batch_size=batch_size,
                           rank=info.rank, world_size=info.world_size,
                           num_workers=self.cfg.num_workers if train else 0, seed=seed,
                           mode="random-crop" if train else "center", flip=train and self.cfg.random_flip,
                           skip_bad_shards=self.cfg.skip_bad_shards)

    def _noised(self, images: torch.Tensor, generator: torch.Generator):
        t = torch.randint(0, self.num_timesteps, (images.shape[0],), generator=generator,
                          device=generator.device).to(images.device)
        noise = torch.randn(images.shape, generator=generator, device=generator.device).to(images.device)
        return self.diffusion.q_sample(images, t, noise), t

    def losses(self, model_fn, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Cross-entropy of one micro-batch at uniform t."""
        x_t, t = self._noised(images, self.generator)
        logits = model_fn(x_t, self.diffusion.original_timesteps(t))
        loss = F.cross_entropy(logits, labels, reduction="none")
        hits = topk_hits(logits.detach(), labels)
        return {"loss": loss.mean(), "t": t,
                "metrics": {"loss": loss.detach(), "acc@1": hits[1], "acc@5": hits[5]}}

    def after_micro_step(self, out: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- validation ---------------------------------------------------------------------------
    def periodic(self, step: int, final: bool) -> None:
        every = self.cfg.eval_every
        if self.cfg.val_data and ((every and step % every == 0) or final):
            self.validate(step)

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Loss and accuracies over one pass of the validation shards (centre crops, fixed noise).

        Ranks hold different numbers of validation samples, but sharded models need every rank in
        each forward: all ranks keep going (masking samples of the next epoch) until none has
        samples of the first epoch left, or `eval_batches` batches.
        """
        trainer = self.trainer
        loader = self.make_loader(self.cfg.val_data, trainer.micro_batch, seed=self.cfg.seed, train=False)
        window = MetricWindow(self.metric_names, self.num_timesteps, trainer.device)
        generator = torch.Generator(device=trainer.device).manual_seed(
            train_loop.rank_seed(self.cfg.seed + 12345, trainer.info.rank))
        was_training = trainer.strategy.module.training
        trainer.strategy.module.eval()
        batches = iter(loader)
        done = 0
        while not self.cfg.eval_batches or done < self.cfg.eval_batches:
            batch = next(batches)
            keep = (batch["epochs"] == 0).to(trainer.device)
            if _all_ranks_false(bool(keep.any()), trainer.device):
                break
            images = batch["images"].to(trainer.device)
            labels = batch["labels"].to(trainer.device)
            x_t, t = self._noised(images, generator)
            logits = trainer.model_fn(x_t, self.diffusion.original_timesteps(t))
            loss = F.cross_entropy(logits, labels, reduction="none")
            hits = topk_hits(logits, labels)
            if keep.any():
                window.add(t[keep], {"loss": loss[keep], "acc@1": hits[1][keep], "acc@5": hits[5][keep]})
            done += 1
        trainer.strategy.module.train(was_training)
        values = window.reduce(trainer.device)
        trainer.logger.scalars(step, values, prefix="val")
        trainer.logger.line("validation " + format_metrics(step, values, ("loss", "acc@1", "acc@5", "acc@1_q0", "acc@1_q3")))
        self.last_validation = values
        return values


def _all_ranks_false(local: bool, device: torch.device) -> bool:
    """True when `local` is False on every rank (a collective)."""
    flag = torch.tensor([int(local)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def train_classifier(cfg: ClassifierTrainConfig, run_dir: str | os.PathLike) -> int:
    """Train (or resume) a noisy classifier into `run_dir`; returns the final step.

    `cfg` may be unresolved (preset recipe values still None). Raises
    `launch.train.loop.Preempted` after checkpointing on a stop signal.
    """
    cfg, preset = resolve(cfg)
    return train_loop.run(cfg, preset, run_dir, ClassifierObjective)
