"""Sample files and reference batches as the evaluator sees them: what ADM's evaluator would misread
is refused, reference statistics are read and written. The `.npz` reading itself is runtime.npz's.
"""
from __future__ import annotations

import os

import numpy as np

from runtime.files import atomic_open
from runtime.npz import NpzArray, npz_keys, read_array

REFERENCE_FEATURES = "inception-2015-12-05"


def open_images(path: str | os.PathLike, key: str = "arr_0") -> NpzArray:
    """Open the images of a sample file or reference batch, refusing what ADM's evaluator misreads.

    Accepted: uint8 (N, H, W, 3), RGB, NHWC. Floats, NCHW, greyscale or empty arrays raise
    ValueError with the conversion to apply.
    """
    arr = NpzArray(path, key)
    try:
        _check_images(arr.shape, arr.dtype, f"{arr.path}:{key}")
    except ValueError:
        arr.close()
        raise
    return arr


def _check_images(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8:
        hint = ("if the samples are in [-1, 1], convert with ((x + 1) * 127.5).clip(0, 255).astype(np.uint8); "
                "if in [0, 255], with x.clip(0, 255).astype(np.uint8)" if dtype.kind == "f"
                else "convert with x.clip(0, 255).astype(np.uint8)")
        raise ValueError(f"{where} has dtype {dtype}; sample files hold uint8 pixels 0..255 (ADM's "
                         f"evaluator would silently misread this): {hint}")
    if len(shape) != 4:
        raise ValueError(f"{where} has shape {shape}; expected (N, H, W, 3) uint8 images"
                         + ("; for greyscale (N, H, W) repeat the channel: np.repeat(x[..., None], 3, -1)"
                            if len(shape) == 3 else ""))
    if shape[-1] != 3:
        if shape[1] == 3:
            hint = "it looks like NCHW: convert with x.transpose(0, 2, 3, 1)"
        elif shape[-1] == 1:
            hint = "greyscale: repeat the channel with np.repeat(x, 3, axis=-1)"
        else:
            hint = "RGB images with channels last are expected"
        raise ValueError(f"{where} has shape {shape}, not (N, H, W, 3): {hint}")
    if shape[0] == 0:
        raise ValueError(f"{where} holds no images")


def read_labels(path: str | os.PathLike, num_images: int) -> np.ndarray | None:
    """`arr_1` of a sample file as int64, or None when the file has no labels."""
    if "arr_1" not in npz_keys(path):
        return None
    labels = read_array(path, "arr_1")
    if labels.ndim != 1 or labels.shape[0] != num_images or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: arr_1 should hold {num_images} integer class labels, got "
                         f"{labels.dtype} of shape {labels.shape}")
    return labels.astype(np.int64)


def read_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Stored Inception statistics of a reference batch (`mu, sigma` and, if present, `mu_s, sigma_s`),
    or None when the file stores none (then they are computed from its images)."""
    keys = set(npz_keys(path))
    if "mu" not in keys:
        return None
    if "sigma" not in keys:
        raise ValueError(f"{path} has `mu` but no `sigma`; rebuild it with adm make-reference")
    stats = {k: read_array(path, k).astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    if "features" in keys:
        name = str(read_array(path, "features"))
        if name != REFERENCE_FEATURES:
            raise ValueError(f"{path} stores statistics of {name!r} features; only {REFERENCE_FEATURES!r} "
                             f"statistics are used from a file")
    return stats


def write_reference_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                          stats: dict[str, np.ndarray] | None = None) -> None:
    """Write a reference batch in ADM's layout, atomically.

    `images`: uint8 (N, H, W, 3) -> `arr_0`; `labels` -> `arr_1`; `stats` may hold `mu, sigma, mu_s,
    sigma_s` (Inception statistics, stored as float64 with `features` naming the network).
    """
    images = np.asarray(images)
    _check_images(images.shape, images.dtype, "reference images")
    arrays: dict[str, np.ndarray] = {"arr_0": np.ascontiguousarray(images)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    if stats:
        unknown = set(stats) - {"mu", "sigma", "mu_s", "sigma_s"}
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; use mu, sigma, mu_s, sigma_s")
        arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in stats.items()})
        arrays["features"] = np.array(REFERENCE_FEATURES)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)
