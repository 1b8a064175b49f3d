"""A small CNN trained on the dataset's clean images, used as the feature network where Inception
means little (digits, medical images, ...): "FID with domain features".

Its global-pooled penultimate activations are the features (FID, precision/recall), its logits give
the Inception Score and the class accuracy of samples against the labels they were drawn for.
Trains in about half a minute on a CPU for 32 px digits (see docs/evaluation.md).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.files import atomic_torch_save
from runtime.safe_load import load_torch_file

FORMAT = "adm-domain-classifier/1"


@dataclasses.dataclass(frozen=True)
class DomainClassifierConfig:
    """image_size: input side (other sizes are resized); widths: channels of the three stages."""

    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self):
        if self.image_size < 8 or self.num_classes < 2 or not self.widths:
            raise ValueError(f"invalid domain classifier config {self}: need image_size >= 8, "
                             f"num_classes >= 2 and at least one stage width")


def _unit(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DomainClassifier(nn.Module):
    """Stages of two conv-BN-ReLU units (max-pool between stages), global average pool, linear head.

    `forward(x)` takes float NCHW in [-1, 1] and returns logits; `__call__`-compatible feature API:
    `extract(images)` takes uint8 NHWC and returns `(pool, None, logits)` (evaluation.features wraps it).
    """

    def __init__(self, config: DomainClassifierConfig):
        super().__init__()
        self.config = config
        stages, cin = [], 3
        for i, width in enumerate(config.widths):
            stage = [_unit(cin, width), _unit(width, width)]
            if i < len(config.widths) - 1:
                stage.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, widths[-1]) of float NCHW input in [-1, 1]."""
        return self.stages(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def to_input(self, images) -> torch.Tensor:
        """uint8 NHWC images -> float NCHW in [-1, 1] at the trained size, on the model's device."""
        x = torch.as_tensor(images).to(self.head.weight.device)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC RGB images, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def extract(self, images) -> tuple[torch.Tensor, None, torch.Tensor]:
        """Features of uint8 NHWC images: pool = penultimate activations, logits = class scores."""
        was_training = self.training
        self.eval()
        pool = self.embed(self.to_input(images))
        self.train(was_training)
        return pool, None, self.head(pool)


def save_domain_classifier(path: str | os.PathLike, model: DomainClassifier, extra: dict | None = None) -> None:
    """Write weights + config (+ e.g. validation accuracy) atomically; loadable with weights_only=True."""
    config = dataclasses.asdict(model.config)
    config["widths"] = list(config["widths"])
    atomic_torch_save(path, {"format": FORMAT, "config": config,
                             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                             "extra": extra or {}})


def load_domain_classifier(path: str | os.PathLike, device="cpu") -> DomainClassifier:
    """Load a classifier written by `train_domain_classifier` / `save_domain_classifier` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain classifier {path} does not exist; train one with "
                                f"`adm evaluate --train-classifier SHARDS --out FILE` (docs/evaluation.md)")
    blob = load_torch_file(path, "domain classifier")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a domain classifier file (format {FORMAT}); train one with "
                         f"train_domain_classifier")
    try:
        config = dict(blob["config"])
        config["widths"] = tuple(config["widths"])
        model = DomainClassifier(DomainClassifierConfig(**config))
        model.load_state_dict(blob["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is a damaged domain classifier file ({first})") from None
    model.extra = dict(blob.get("extra", {}))
    return model.to(device).eval()


def _as_arrays(data, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tuple) and len(data) == 2:
        images, labels = np.asarray(data[0]), np.asarray(data[1])
    else:
        from evaluation.shard_images import load_shard_arrays

        images, labels = load_shard_arrays(data, image_size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"training images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}")
    return images, labels.astype(np.int64)


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    # Random translations of up to `shift` pixels: samples are rarely centred exactly like the data.
    if shift == 0:
        return x
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Share of images whose arg-max class equals the label."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model.extract(images[i:i + batch_size])[2]
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(labels[i:i + batch_size])).sum())
    return correct / max(1, len(images))


def train_domain_classifier(data, out_path: str | os.PathLike | None = None, *, image_size: int | None = None,
                            num_classes: int | None = None, widths: Sequence[int] = (32, 64, 128),
                            epochs: int = 4, batch_size: int = 128, lr: float = 3e-3,
                            val_fraction: float = 0.1, shift: int = 2, seed: int = 0,
                            device="cpu", log: Callable[[str], None] | None = print) -> tuple[DomainClassifier, dict]:
    """Train the domain classifier and (if `out_path`) save it; returns `(model, info)`.

    `data`: `(images uint8 NHWC, labels)` arrays, or a shard argument (folder, pattern, list) read
    with ADM's centre crop at `image_size`. `image_size` defaults to the images' side,
    `num_classes` to max(label) + 1. A stratification-free random `val_fraction` is held out; `info`
    has `val_accuracy`, `train_accuracy`, `seconds`, `num_train`, `num_val`. One-cycle learning rate
    (AdamW) with random shifts of up to `shift` pixels.
    """
    if image_size is None and not isinstance(data, tuple):
        raise ValueError("image_size is required when training from shards (e.g. image_size=32)")
    images, labels = _as_arrays(data, image_size or 0)
    image_size = image_size or images.shape[1]
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen).numpy()
    n_val = int(round(len(images) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    model = DomainClassifier(DomainClassifierConfig(image_size, num_classes, tuple(widths))).to(device)
    x_train = model.to_input(images[train_idx]).cpu()
    y_train = torch.as_tensor(labels[train_idx])
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _augment(x_train[idx], shift, gen).to(device)
            loss = F.cross_entropy(model(x), y_train[idx].to(device))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            log(f"domain classifier epoch {epoch + 1}/{epochs}: loss {total / len(train_idx):.4f}")
    model.eval()
    info = {"seconds": time.perf_counter() - start, "num_train": int(len(train_idx)), "num_val": int(n_val),
            "train_accuracy": accuracy(model, images[train_idx], labels[train_idx]),
            "val_accuracy": accuracy(model, images[val_idx], labels[val_idx]) if n_val else None,
            "epochs": epochs, "seed": seed}
    if log:
        log(f"domain classifier: val accuracy {info['val_accuracy']}, {info['seconds']:.1f} s")
    if out_path is not None:
        save_domain_classifier(out_path, model, info)
    return model, info
