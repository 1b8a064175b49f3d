"""The `.npz` format, read and written in pieces: one reader and one writer for every file we handle.

An `.npz` is a zip of `.npy` members. `NpzArray` parses a member's `.npy` header and reads rows on
demand, so 50k images at 512 px (39 GB) are never in memory at once: stored (`np.savez`) members are
read at their absolute file offset (random access, cheap per-rank slices); deflated
(`np.savez_compressed`) members are decompressed as a stream. Nothing is unpickled: object arrays
are refused. `write_streamed_npz` writes what `np.savez` would, one chunk at a time, atomically.

Files from others are checked, never trusted (each failure is one ValueError naming the file):
- the `.npy` header's shape and dtype must account for exactly the member's size, before anything is
  allocated, so no read goes past the member's end (into the next member) and no absurd header
  allocates memory;
- the zip CRC-32 of the member is checked as its bytes are read, without holding them: whenever the
  reads of one NpzArray have covered the whole member in order (a whole-array `read()`, sequential
  `batches()` from row 0, one process evaluating a file), the CRC is compared when the last byte
  arrives. Ranks that each read a contiguous slice instead publish `crc_run()` (where their bytes
  start and end, and their CRC-32) and `check_crc_runs` combines them (`crc32_combine`, no extra I/O);
  a caller reading rows in any other order calls `verify()`, one streaming pass over the member.
"""
from __future__ import annotations

import ast
import io
import os
import struct
import zipfile
import zlib
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
        self._zip = _open_zip(self.path)
        self._raw = None
        try:
            self._open_member(key)
        except BaseException:
            self.close()
            raise

    def _open_member(self, key: str) -> None:
        member = f"{key}.npy"
        if member not in self._zip.namelist():
            keys = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            raise ValueError(f"{self.path} has no array {key!r} (it holds {keys})")
        self._info = self._zip.getinfo(member)
        where = f"{self.path}:{key}"
        try:
            self._stream = self._zip.open(member)
            header = _read_npy_header(self._stream, where)
        except (zipfile.BadZipFile, NotImplementedError, EOFError, struct.error, OSError) as err:
            raise ValueError(f"{where}: corrupt .npz member ({err})") from None
        self.shape, self.dtype, header_len, header_bytes = header
        self._data_start = header_len
        self._row_bytes = int(np.prod(self.shape[1:], dtype=object)) * self.dtype.itemsize
        data_bytes = int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize
        if header_len + data_bytes != self._info.file_size:
            raise ValueError(f"{where}: the header declares shape {self.shape} of {self.dtype} ({data_bytes:,} bytes) "
                             f"but the member holds {self._info.file_size - header_len:,} bytes of data: a corrupt "
                             "or forged file")
        # The CRC run: which bytes of the member have been hashed, in order, and their CRC-32.
        self._run_start, self._run_end, self._run_crc = 0, header_len, zlib.crc32(header_bytes)
        self.verified = False
        if self._info.compress_type == zipfile.ZIP_STORED:
            if self._info.compress_size != self._info.file_size:
                raise ValueError(f"{where}: corrupt zip entry (stored member with differing sizes)")
            self._raw = open(self.path, "rb")
            start = _member_data_offset(self._raw, self._info)
            if start + self._info.file_size > os.fstat(self._raw.fileno()).st_size:
                raise ValueError(f"{self.path} is truncated: {key} ends past the end of the file")
            self._raw_offset = start + header_len

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
        try:
            if self._raw is not None:
                self._raw.seek(self._raw_offset + offset)
                data = self._raw.read(size)
            else:
                # ZipExtFile seeks forward by decompressing, backward by restarting: sequential reads are cheap.
                self._stream.seek(self._data_start + offset)
                data = self._stream.read(size)
        except (zipfile.BadZipFile, EOFError, OSError) as err:  # deflated data: zipfile's own CRC or stream error
            raise ValueError(f"{self.path}:{self._info.filename}: corrupt data ({err})") from None
        if len(data) != size:
            raise ValueError(f"{self.path} is truncated: wanted {size} bytes at offset {offset} of "
                             f"{self._info.filename}, got {len(data)}")
        self._hash(self._data_start + offset, data)
        return np.frombuffer(data, dtype=np.uint8).copy()

    def _hash(self, position: int, data: bytes) -> None:
        if position == self._run_end:
            self._run_crc = zlib.crc32(data, self._run_crc)
            self._run_end += len(data)
        elif len(data):
            self._run_start, self._run_end, self._run_crc = position, position + len(data), zlib.crc32(data)
        if self._run_start == 0 and self._run_end == self._info.file_size and not self.verified:
            self._check(self._run_crc)

    def _check(self, crc: int) -> None:
        if crc != self._info.CRC:
            raise ValueError(f"{self.path}:{self._info.filename} fails its zip CRC-32 check (stored {self._info.CRC:08x}, "
                             f"data gives {crc:08x}): the file is corrupt; nothing read from it can be trusted")
        self.verified = True

    def crc_run(self) -> tuple[int, int, int]:
        """(first byte, end byte, CRC-32) of the member bytes read so far in one contiguous run.

        The run starts with the header (read on open) and continues while reads follow each other;
        a read elsewhere starts a new run. `check_crc_runs` combines the runs of several readers.
        """
        return self._run_start, self._run_end, self._run_crc

    @property
    def member_size(self) -> int:
        """Bytes of this array's `.npy` member (header + data)."""
        return self._info.file_size

    @property
    def member_crc(self) -> int:
        """The CRC-32 the zip directory records for this member."""
        return self._info.CRC

    def verify(self, chunk_bytes: int = 16 << 20) -> None:
        """Check the member's CRC-32 in one streaming pass (bounded memory); ValueError if it fails."""
        if self.verified:
            return
        crc, done = 0, 0
        with self._zip.open(self._info) as stream:
            while done < self._info.file_size:
                try:
                    data = stream.read(min(chunk_bytes, self._info.file_size - done))
                except (zipfile.BadZipFile, EOFError, OSError) as err:
                    raise ValueError(f"{self.path}:{self._info.filename}: corrupt data ({err})") from None
                if not data:
                    raise ValueError(f"{self.path} is truncated inside {self._info.filename}")
                crc, done = zlib.crc32(data, crc), done + len(data)
        self._check(crc)

    def close(self) -> None:
        """Close the underlying files."""
        for handle in (getattr(self, "_stream", None), self._zip, self._raw):
            if handle is not None:
                handle.close()

    def __enter__(self) -> "NpzArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MAX_HEADER = 1 << 16  # numpy itself writes a few hundred bytes; refuse to read megabytes of "header"


def _read_npy_header(stream, where: str) -> tuple[tuple[int, ...], np.dtype, int, bytes]:
    """Parse an .npy header: (shape, dtype, total header length in bytes, the header's bytes)."""
    prefix = stream.read(8)
    if len(prefix) != 8 or prefix[:6] != _MAGIC:
        raise ValueError(f"{where} is not an .npy array (bad magic)")
    major = prefix[6]
    if major == 1:
        size_field = stream.read(2)
        (length,), size_len = struct.unpack("<H", size_field), 2
    elif major in (2, 3):
        size_field = stream.read(4)
        (length,), size_len = struct.unpack("<I", size_field), 4
    else:
        raise ValueError(f"{where}: unsupported .npy format version {major}")
    if length > _MAX_HEADER:
        raise ValueError(f"{where}: an .npy header of {length:,} bytes is not a real header")
    raw = stream.read(length)
    text = raw.decode("utf-8" if major == 3 else "latin1", errors="replace")
    try:
        header = ast.literal_eval(text)
        dtype = np.dtype(header["descr"])
        shape = tuple(int(s) for s in header["shape"])
        fortran = bool(header["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as err:
        raise ValueError(f"{where}: unreadable .npy header {text[:200]!r} ({type(err).__name__})") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{where}: negative dimension in the .npy header shape {shape}")
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (pickled); only plain numeric arrays are read")
    if fortran and len(shape) > 1:
        raise ValueError(f"{where} is stored in Fortran order and cannot be read by rows; save it "
                         f"with np.ascontiguousarray(x)")
    return shape, dtype, 8 + size_len + length, prefix + size_field + raw


def _member_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's first byte: after its local header (30 bytes + name + extra)."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError(f"{raw.name}: corrupt zip (bad local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, struct.error, ValueError,
            OSError) as err:
        raise ValueError(f"{path} is not an .npz file (not a readable zip archive: {err}); write "
                         f"samples with np.savez(path, arr_0=images, arr_1=labels)") from None


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays in an .npz, without reading them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with _open_zip(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def read_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """One (small) array of an .npz read whole (CRC-checked), e.g. `mu` or `sigma` of a reference batch."""
    with NpzArray(path, key) as arr:
        out = arr.read()
        arr.verify()  # a no-op after the whole read above, except for an empty array
        return out


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A whole `.npy` file, its header checked against the file size before anything is allocated."""
    path = Path(path)
    with open(path, "rb") as handle:
        shape, dtype, header_len, _ = _read_npy_header(handle, str(path))
        size = os.fstat(handle.fileno()).st_size
        data_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if header_len + data_bytes != size:
            raise ValueError(f"{path}: the header declares shape {shape} of {dtype} ({data_bytes:,} bytes) but the "
                             f"file holds {size - header_len:,} bytes of data: a corrupt or forged file")
        data = handle.read(data_bytes)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


# ----------------------------------------------------------------------------------------------
# CRC-32 of pieces read by different processes

_CRC_POLY = 0xEDB88320  # zlib's CRC-32, bit-reflected


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, column) for column in matrix]


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B), in O(log len(B)) (no data needed).

    zlib's CRC is affine in its register: appending B to A gives crc32(B) XOR the register crc32(A)
    advanced over len(B) zero bytes, and that advance is a linear map on 32 bits (a GF(2) matrix),
    raised to the power len(B) by repeated squaring.
    """
    if length_b <= 0:
        return crc_a
    # The register advanced over one zero bit: shift right, folding in the polynomial.
    one_bit = [_CRC_POLY] + [1 << i for i in range(31)]
    power = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # eight zero bits: one zero byte
    register, n = crc_a, length_b
    while n:
        if n & 1:
            register = _gf2_times(power, register)
        n >>= 1
        if n:
            power = _gf2_square(power)
    return register ^ crc_b


def check_crc_runs(runs: Iterable[tuple[int, int, int] | None], member_size: int, expected: int, where: str) -> bool:
    """Combine the CRC runs of several readers of one member (e.g. one per rank).

    Returns True when they tile the whole member and the combined CRC matches, False when they do
    not cover it (nothing can be said); raises ValueError when they cover it and the CRC differs.
    """
    # Longest first among runs starting together: a reader that read only the header (an empty
    # slice) repeats bytes another reader covered, and is skipped.
    pieces = sorted((r for r in runs if r is not None and r[1] > r[0]), key=lambda r: (r[0], -r[1]))
    position, crc = 0, 0
    for start, end, piece in pieces:
        if end <= position:
            continue
        if start != position:  # a gap, or a partial overlap: the runs do not tile the member
            return False
        crc, position = crc32_combine(crc, piece, end - start), end
    if position != member_size:
        return False
    if crc != expected:
        raise ValueError(f"{where} fails its zip CRC-32 check (stored {expected:08x}, data gives {crc:08x}): the "
                         "file is corrupt; nothing read from it can be trusted")
    return True


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
