"""The `.npz` format, read and written in pieces: one reader and one writer for every file we handle.

An `.npz` is a zip of `.npy` members. `NpzArray` parses a member's `.npy` header and reads rows on
demand, so 50k images at 512 px (39 GB) are never in memory at once: stored (`np.savez`) members are
read at their absolute file offset (random access, cheap per-rank slices); deflated
(`np.savez_compressed`) members are decompressed as a stream. Nothing is unpickled: object arrays
are refused. `write_streamed_npz` writes what `np.savez` would, one chunk at a time, atomically.
"""
from __future__ import annotations

import ast
import io
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from runtime.files import atomic_open

_MAGIC = b"\x93NUMPY"


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

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows) -> np.ndarray:
        """`arr[a:b]` (a contiguous slice) or `arr[index_array]` (rows in that order); read from disk."""
        if isinstance(rows, slice):
            if rows.step not in (None, 1):
                raise TypeError("NpzArray slices must be contiguous (no step)")
            start, stop, _ = rows.indices(len(self))
            return self.read(start, max(start, stop))
        index = np.asarray(rows)
        if index.dtype.kind not in "iu" or index.ndim != 1:
            raise TypeError("NpzArray takes a slice or a 1-D array of row indices")
        out = np.empty((len(index),) + tuple(self.shape[1:]), dtype=self.dtype)
        for k, i in enumerate(index.tolist()):
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} is outside {self.path}:{self._info.filename} ({len(self)} rows)")
            out[k] = self.read(i % len(self), i % len(self) + 1)[0]
        return out

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


def _npy_header_bytes(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def write_streamed_npz(path: str | os.PathLike, image_chunks: Iterable[np.ndarray], label_chunks: Iterable[np.ndarray],
                       num_samples: int, image_shape: Sequence[int]) -> None:
    """Write `path` as `np.savez(path, arr_0=images, arr_1=labels)` would, from chunks in index order.

    Each chunk is written and dropped before the next is asked for, so memory stays at one chunk.
    Both iterables are consumed lazily (the labels after all images). The chunks must add up to
    exactly `num_samples` rows; anything else raises before the file is renamed into place.
    """
    image_shape = tuple(int(s) for s in image_shape)
    with atomic_open(path, "wb") as handle:
        # ZIP_STORED as np.savez: evaluators stream rows straight out of the member.
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, chunks, shape, dtype in (("arr_0.npy", image_chunks, (num_samples, *image_shape), np.uint8),
                                                ("arr_1.npy", label_chunks, (num_samples,), np.int64)):
                written = 0
                with zf.open(name, "w", force_zip64=True) as member:
                    member.write(_npy_header_bytes(shape, dtype))
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        if chunk.shape[1:] != shape[1:]:
                            raise ValueError(f"{name}: chunk of shape {chunk.shape} does not fit {shape}")
                        member.write(chunk.data)
                        written += chunk.shape[0]
                        del chunk
                if written != num_samples:
                    raise ValueError(f"{name}: got {written} rows, expected {num_samples}")
