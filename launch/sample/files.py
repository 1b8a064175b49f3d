"""Files of the sampling job: per-shard files, the streamed final `.npz`, the grid PNG.

A shard holds the samples of one contiguous index range `[start, start + count)`. It is written
atomically, so a shard file that exists is complete; a restarted job trusts it after checking that
it was made with the same options (`options_hash`) and covers the expected range.

The final file is what guided-diffusion's evaluator reads: an uncompressed zip (as `np.savez`
writes it) with `arr_0.npy` (uint8 `[N, H, W, 3]`) and `arr_1.npy` (int64 `[N]`), in index order.
It is written member by member, one shard at a time, so no process ever holds all N images
(50k samples at 512 px are 39 GB).
"""
from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.files import atomic_open, atomic_write_bytes
from runtime.npz import NpzArray, write_streamed_npz

SHARD_DIR = "shards"
_SHARD_PREFIX = "shard-"


# --------------------------------------------------------------------------------------------
# float images -> bytes
# --------------------------------------------------------------------------------------------
def to_uint8(x, rounding: str = "truncate"):
    """Map images in [-1, 1] (torch, NCHW) to uint8 NHWC the way the original writer does.

    `truncate` is guided-diffusion's `uint8(clamp((x + 1) * 127.5, 0, 255))`, which biases every pixel
    down by half a level on average; `round` rounds to the nearest level instead. The published
    numbers were computed on truncated samples, so truncation is the default. Non-finite values
    (a broken network or guidance) raise ValueError instead of becoming black pixels.
    """
    import torch

    if rounding not in ("truncate", "round"):
        raise ValueError(f"rounding must be 'truncate' or 'round', not {rounding!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the sampler produced NaN or infinite pixels (the network's weights or the guidance "
                         "are broken); nothing was written for these samples")
    y = (x.float() + 1.0) * 127.5
    if rounding == "round":
        y = y.round()
    return y.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------
def shard_path(out_dir: str | os.PathLike, shard_id: int) -> Path:
    """Where shard `shard_id` of a sampling run in `out_dir` lives."""
    return Path(out_dir) / SHARD_DIR / f"{_SHARD_PREFIX}{shard_id:06d}.npz"


def write_shard(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, start: int,
                options_hash: str, network_batch: int) -> None:
    """Write one shard atomically: uint8 images `[n, H, W, 3]`, int64 labels `[n]` and what made them
    (the options hash, and the rows per network call, which decide the last bits)."""
    images = np.ascontiguousarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
    assert labels.shape == (images.shape[0],), (labels.shape, images.shape)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, images=images, labels=labels, start=np.int64(start),
                 options_hash=np.array(options_hash), network_batch=np.int64(network_batch))


def read_shard_meta(path: str | os.PathLike) -> dict:
    """The small fields of a shard (start, count, image shape, options hash) without reading its pixels."""
    with NpzArray(path, "images") as images:
        shape, dtype = images.shape, images.dtype
    with np.load(path) as z:
        return {"start": int(z["start"]), "count": int(shape[0]), "image_shape": tuple(shape[1:]),
                "dtype": dtype, "options_hash": str(z["options_hash"]),
                "network_batch": int(z["network_batch"])}


def shard_is_valid(path: str | os.PathLike, start: int, count: int, image_shape: Sequence[int],
                   options_hash: str) -> bool:
    """True when `path` is a finished shard of exactly this range, shape and options."""
    try:
        meta = read_shard_meta(path)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return (meta["start"] == start and meta["count"] == count and meta["dtype"] == np.uint8
            and meta["image_shape"] == tuple(image_shape) and meta["options_hash"] == options_hash)


def read_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one shard."""
    with np.load(path) as z:
        return z["images"], z["labels"]


def list_shard_files(out_dir: str | os.PathLike) -> list[Path]:
    """Every finished shard file under `out_dir/shards` (temporary files of killed writers excluded)."""
    folder = Path(out_dir) / SHARD_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{_SHARD_PREFIX}*.npz"))


def remove_stale_temporaries(out_dir: str | os.PathLike) -> int:
    """Delete half-written files that a killed writer left behind; return how many."""
    removed = 0
    for folder in (Path(out_dir), Path(out_dir) / SHARD_DIR):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# the merged .npz
# --------------------------------------------------------------------------------------------
def merge_shards(shard_files: Sequence[str | os.PathLike], out_path: str | os.PathLike, num_samples: int,
                 image_shape: Sequence[int]) -> Path:
    """Stream the shards (already in index order) into the final `samples_...npz`; return its path.

    Reads one shard at a time: peak memory is one shard's images, whatever N is.
    """
    shard_files = [Path(p) for p in shard_files]

    def images():
        for p in shard_files:
            with np.load(p) as z:
                yield z["images"]

    def labels():
        for p in shard_files:
            with np.load(p) as z:
                yield z["labels"]

    write_streamed_npz(out_path, images(), labels(), num_samples, image_shape)
    return Path(out_path)


def samples_file_name(num_samples: int, image_shape: Sequence[int]) -> str:
    """The name guided-diffusion gives a sample file: `samples_{N}x{H}x{W}x3.npz`."""
    return "samples_" + "x".join(str(int(s)) for s in (num_samples, *image_shape)) + ".npz"


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------
def write_grid(path: str | os.PathLike, images: np.ndarray, columns: int | None = None, pad: int = 2) -> None:
    """Write uint8 NHWC `images` as one PNG grid (row-major, index order), atomically."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = images[k]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
