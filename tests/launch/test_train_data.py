"""Tiny real shards for the training tests: scikit-learn's handwritten digits (10 classes).

`digit_shards(folder, ...)` writes the 8x8 digits as upscaled RGB images in class folders
(digit_0 .. digit_9, labels 0..9) and converts them with the real `prepare_imagenet`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data.loader import ShardLoader
from data.prepare import prepare_imagenet


def digit_shards(out: Path, split: str = "train", per_class: int = 12, size: int = 20,
                 samples_per_shard: int = 10) -> Path:
    """Shards of `per_class` digits per class (train: the first ones, val: the last ones)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = out.parent / f"{out.name}-src"
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        idx = idx[:per_class] if split == "train" else idx[-per_class:]
        folder = src / f"digit_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            grey = (digits.images[i] * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(folder / f"digit_{c}_{i:04d}.png")
    prepare_imagenet(src, out, samples_per_shard=samples_per_shard, allow_custom_classes=True)
    return out


def test_digit_shards_hold_ten_labelled_classes(tmp_path):
    shards = digit_shards(tmp_path / "digits", per_class=3, samples_per_shard=8)
    loader = ShardLoader(shards, image_size=16, batch_size=30, seed=0)
    batch = next(iter(loader))
    assert loader.num_classes == 10 and loader.num_samples == 30
    assert batch["images"].shape == (30, 3, 16, 16)
    assert sorted(batch["labels"].tolist()) == sorted(list(range(10)) * 3)
