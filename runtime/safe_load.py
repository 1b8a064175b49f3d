"""Reading pickled formats that may come from someone else, without running code from them.

Run folders, checkpoints and model files are shared between people; Python's `pickle` runs whatever
a file asks for. Every pickled file the project reads therefore goes through one of these:

- `load_torch_file`: `torch.load(weights_only=True)` (tensors, containers, numbers and the extra
  classes the caller names), with refusals turned into one-line `RefusedFile` errors naming the file.
- `read_dcp_metadata` / `SafeFileSystemReader` / `dcp_load`: torch.distributed.checkpoint folders.
  DCP unpickles its `.metadata` with plain `pickle`; here a restricted unpickler admits only DCP's own
  metadata classes (plus torch.Size, dtypes and layouts), and the storage entries are checked to name
  files inside the checkpoint folder with offsets inside those files. The data files are read by
  torch with weights-only loading, forced for DCP's non-tensor items too (`forced_weights_only`).
- `forced_weights_only`: a context in which every `torch.load` (also inside libraries such as
  DeepSpeed that pass `weights_only=False`) is weights-only, optionally admitting named classes.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class RefusedFile(ValueError):
    """A file asked for something other than plain data (or is malformed in a way that could hide it)."""


def _reason(err: BaseException) -> str:
    """The informative part of torch's long weights-only message: which global the file asked for."""
    text = str(err)
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
    if found:
        return f"it asks for {found.group(1)}, which is not plain data"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return first[:300]


@contextlib.contextmanager
def forced_weights_only(allowed: Iterable[Any] = ()) -> Iterator[None]:
    """Every `torch.load` in this block is weights-only, whatever its caller passes; `allowed` classes
    (e.g. a library's loss-scaler record) are admitted besides plain data.

    Works through torch's own switch (TORCH_FORCE_WEIGHTS_ONLY_LOAD, read on every call), so it also
    covers loads inside libraries we call. The environment is restored afterwards.
    """
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_torch_file(path: str | os.PathLike, what: str = "file", allowed: Iterable[Any] = (),
                    map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load` with weights-only loading; a refused or unreadable file raises one-line errors.

    `what` names the file's role in the message ("model file", "training checkpoint", ...).
    RefusedFile when the file asks for a class or function that is not plain data (`allowed` adds
    classes), ValueError when it is not a torch file at all, FileNotFoundError when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise RefusedFile(f"{path}: refused to load this {what}: {_reason(err)} (only tensors and plain "
                          "data are loaded from files; see docs/security.md)") from None
    except (RuntimeError, EOFError, OSError, KeyError, AttributeError, TypeError, ValueError) as err:
        if mmap and "mmap" in str(err):
            raise  # the caller retries without memory mapping (legacy serialisation)
        raise ValueError(f"{path} is not a readable {what}: {_reason(err)}") from None


# ----------------------------------------------------------------------------------------------
# torch.distributed.checkpoint

_DCP = "torch.distributed.checkpoint"
# Everything DCP's FileSystemWriter pickles into `.metadata` (checked against torch 2.x checkpoints
# written by DDP, FSDP2 and the DeepSpeed EMA), and nothing else.
_DCP_GLOBALS = {
    (f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
}
METADATA_NAME = ".metadata"  # DCP's name for the global metadata file (`__RANK.metadata` per rank)


class _MetadataUnpickler(pickle.Unpickler):
    """Plain pickle, except that only DCP's metadata classes (and torch dtypes/layouts) can be named."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id (DCP metadata holds none)")


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not any(ord(c) < 32 or ord(c) == 127 for c in name))


def read_dcp_metadata(path: str | os.PathLike) -> Any:
    """Unpickle and check a DCP `.metadata` file; RefusedFile (naming it) for anything else.

    Checked: only DCP metadata classes; every storage entry names a plain file in the same folder
    (no path separators or '..'), with an offset and length inside that file and no stream
    transforms (we never write any, and they would decompress data).
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint metadata {path} does not exist (an incomplete checkpoint?)")
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise RefusedFile(f"{path}: refused to load this checkpoint metadata: it asks for {err}, which is "
                          "not a torch.distributed.checkpoint metadata class (see docs/security.md)") from None
    except Exception as err:  # malformed pickle data: truncated, wrong arguments to an admitted class...
        raise RefusedFile(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {_reason(err)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise RefusedFile(f"{path}: not torch.distributed.checkpoint metadata (holds {type(metadata).__name__})")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise RefusedFile(f"{path}: checkpoint metadata without a storage table")
    sizes: dict[str, int] = {}
    for entry in storage.values():
        if not isinstance(entry, _StorageInfo) or not _plain_name(entry.relative_path):
            raise RefusedFile(f"{path}: a storage entry names {getattr(entry, 'relative_path', entry)!r}, not a "
                              "file of this checkpoint folder")
        if getattr(entry, "transform_descriptors", None):
            raise RefusedFile(f"{path}: storage entry {entry.relative_path} asks for stream transforms "
                              f"{entry.transform_descriptors!r}, which this project never writes")
        if entry.relative_path not in sizes:
            data_file = path.parent / entry.relative_path
            sizes[entry.relative_path] = data_file.stat().st_size if data_file.is_file() else -1
        size = sizes[entry.relative_path]
        offset, length = entry.offset, entry.length
        if size < 0:
            raise FileNotFoundError(f"{path}: its data file {entry.relative_path} is missing (an incomplete checkpoint?)")
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
                and offset + length <= size):
            raise RefusedFile(f"{path}: storage entry [{offset!r}, +{length!r}) lies outside "
                              f"{entry.relative_path} ({size} bytes)")
    return metadata


def _filesystem_reader():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's FileSystemReader with `.metadata` read by `read_dcp_metadata` instead of plain pickle."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
            metadata = read_dcp_metadata(Path(self.path) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def safe_filesystem_reader(folder: str | os.PathLike):
    """A `torch.distributed.checkpoint` storage reader for `folder` that never unpickles code."""
    return _filesystem_reader()(str(folder))


def dcp_load(state_dict: dict, folder: str | os.PathLike, no_dist: bool = False) -> None:
    """`torch.distributed.checkpoint.load(state_dict, folder)` through the safe reader, in place.

    The metadata is checked before DCP starts (so every rank refuses the same file the same way),
    all of DCP's `torch.load` calls are weights-only, and DCP's multi-line CheckpointException
    becomes one ValueError naming the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    read_dcp_metadata(folder / METADATA_NAME)
    try:
        with forced_weights_only():
            dcp.load(state_dict, storage_reader=safe_filesystem_reader(folder), no_dist=no_dist)
    except CheckpointException as err:
        failures = list(err.failures.values())
        cause = failures[0][0] if failures and isinstance(failures[0], tuple) else err
        if isinstance(cause, pickle.UnpicklingError):
            raise RefusedFile(f"{folder}: refused to load a data file of this checkpoint: {_reason(cause)} "
                              "(see docs/security.md)") from None
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise ValueError(f"{folder}: cannot load this checkpoint ({type(cause).__name__}: {_reason(cause)})") from None


__all__ = ["RefusedFile", "forced_weights_only", "load_torch_file", "read_dcp_metadata", "safe_filesystem_reader",
           "dcp_load", "METADATA_NAME"]
