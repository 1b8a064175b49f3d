"""Shared fixtures: a miniature ImageNet of real MNIST digits (with ImageNet's awkward files) and its shards."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from data.miniature import make_miniature_imagenet
from data.prepare import prepare_imagenet

NUM_CLASSES = 4
PER_CLASS = 8
# Per class: 8 RGB JPEGs; plus greyscale + truncated (class 0), CMYK + text file (class 1),
# RGBA PNG (class 2), PNG named .JPEG (class 3). Good samples: 4*8 + 4; skipped: 2.
GOOD_SAMPLES = NUM_CLASSES * PER_CLASS + 4


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mini")


@pytest.fixture(scope="session")
def mini_src(mini_root) -> Path:
    """Class-folder layout: <root>/src/<wnid>/<wnid>_NNNN.JPEG."""
    return make_miniature_imagenet(mini_root / "src", NUM_CLASSES, PER_CLASS, layout="folders")


@pytest.fixture(scope="session")
def mini_tar(mini_root) -> Path:
    """The same images as a tar of per-class tars (ILSVRC2012_img_train.tar layout)."""
    return make_miniature_imagenet(mini_root / "srctar", NUM_CLASSES, PER_CLASS, layout="train-tar")


@pytest.fixture(scope="session")
def mini_shards(mini_root, mini_src) -> Path:
    """10 shards of 4 samples (the last holds the remainder), written once per session; read-only."""
    out = mini_root / "shards"
    prepare_imagenet(mini_src, out, samples_per_shard=4)
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden state included), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "lock"
    }
