"""Sample files and reference batches: streaming reads, validation, atomic writes.

An `.npz` is a zip of `.npy` members. `NpzArray` parses a member's `.npy` header and reads rows on
demand, so 50k images at 512 px (39 GB) are never in memory at once: stored (`np.savez`) members are
read at their absolute file offset (random access, cheap per-rank slices); deflated
(`np.savez_compressed`) members are decompressed as a stream.
"""
from __future__ import annotations

import ast
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from data.fileio import atomic_open

_MAGIC = b"\x93NUMPY"
REFERENCE_FEATURES = "inception-2015-12-05"


class NpzArray:
    """One array of an `.npz`, read by rows. Use as a context manager or call `close()`.

    Attributes: `shape`, `dtype`, `len(self)` (rows). `read(start, stop)` returns rows as a numpy
    array; `batches(batch_size, start, stop)` yields `(first_row_index, rows)`.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{self.path} is not an .npz file (not a zip archive: {err}); write "
                             f"samples with np.savez(path, arr_0=images, arr_1=labels)") from None
        member = f"{key}.npy"
        if member not in self._zip.namelist():
            keys = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            self._zip.close()
            raise ValueError(f"{self.path} has no array {key!r} (it holds {keys})")
        self._info = self._zip.getinfo(member)
        self._stream = self._zip.open(member)
        self.shape, self.dtype, header_len = _read_npy_header(self._stream, f"{self.path}:{key}")
        self._data_start = header_len
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._raw = None
        if self._info.compress_type == zipfile.ZIP_STORED:
            self._raw = open(self.path, "rb")
            self._raw_offset = _member_data_offset(self._raw, self._info) + header_len

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `start:stop` (clipped to the array) as a new numpy array."""
        if not self.shape:
            return self._read_bytes(0, self.dtype.itemsize).view(self.dtype).reshape(())
        n = self.shape[0]
        stop = n if stop is None else min(stop, n)
        start = min(max(start, 0), stop)
        raw = self._read_bytes(start * self._row_bytes, (stop - start) * self._row_bytes)
        return raw.view(self.dtype).reshape((stop - start,) + tuple(self.shape[1:]))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(index_of_first_row, rows)` for consecutive batches of `start:stop`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop, batch_size):
            yield i, self.read(i, min(i + batch_size, stop))

    def _read_bytes(self, offset: int, size: int) -> np.ndarray:
        if self._raw is not None:
            self._raw.seek(self._raw_offset + offset)
            data = self._raw.read(size)
        else:
            # ZipExtFile seeks forward by decompressing, backward by restarting: sequential reads are cheap.
            self._stream.seek(self._data_start + offset)
            data = self._stream.read(size)
        if len(data) != size:
            raise ValueError(f"{self.path} is truncated: wanted {size} bytes at offset {offset} of "
                             f"{self._info.filename}, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def close(self) -> None:
        """Close the underlying files."""
        self._stream.close()
        self._zip.close()
        if self._raw is not None:
            self._raw.close()

    def __enter__(self) -> "NpzArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_npy_header(stream, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Parse an .npy header: (shape, dtype, total header length in bytes)."""
    prefix = stream.read(8)
    if len(prefix) != 8 or prefix[:6] != _MAGIC:
        raise ValueError(f"{where} is not an .npy array (bad magic)")
    major = prefix[6]
    if major == 1:
        (length,), size_len = struct.unpack("<H", stream.read(2)), 2
    elif major in (2, 3):
        (length,), size_len = struct.unpack("<I", stream.read(4)), 4
    else:
        raise ValueError(f"{where}: unsupported .npy format version {major}")
    text = stream.read(length).decode("utf-8" if major == 3 else "latin1")
    try:
        header = ast.literal_eval(text)
        dtype = np.dtype(header["descr"])
        shape = tuple(int(s) for s in header["shape"])
        fortran = bool(header["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: unreadable .npy header {text!r} ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (pickled); only plain numeric arrays are read")
    if fortran and len(shape) > 1:
        raise ValueError(f"{where} is stored in Fortran order and cannot be read by rows; save it "
                         f"with np.ascontiguousarray(x)")
    return shape, dtype, 8 + size_len + length


def _member_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's first byte: after its local header (30 bytes + name + extra)."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"{raw.name}: corrupt zip (bad local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays in an .npz, without reading them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with zipfile.ZipFile(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def read_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """One (small) array of an .npz read whole, e.g. `mu` or `sigma` of a reference batch."""
    with NpzArray(path, key) as arr:
        return arr.read()


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
