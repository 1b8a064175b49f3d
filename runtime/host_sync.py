"""Find the places where a step makes the host wait for the device.

A CUDA step is fast only while the host queues work ahead of the GPU; anything that reads a value
back (`.item()`, `int(t)`, `bool(t)`, `float(t)`, `torch.equal`, `nonzero`, boolean-mask indexing,
a copy to the CPU) stalls the queue until the GPU has caught up. Two tools:

- `HostSyncCounter`: a TorchDispatchMode that records every such operation with the source line
  that caused it (the innermost frame outside torch). It works on CPU tensors too, where nothing
  really waits, so tests on a machine without a GPU count the syncs a GPU step would make.
  `.item()`, `int(t)`, `bool(t)` and `float(t)` all dispatch to `aten._local_scalar_dense`.
- `cuda_sync_debug(mode)`: `torch.cuda.set_sync_debug_mode` for a block ("warn" or "error"),
  restored afterwards; the ground truth on a GPU (it also sees syncs no dispatched op shows).

`torch._assert_async` is not a sync: on a GPU the check runs in a kernel and fails later.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {
    "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "aten::nonzero", "aten::nonzero_static", "aten::argwhere",
    "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::equal",  # returns a host bool
}
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class SyncEvent:
    """One operation that waits for the device: its aten name, the source line, the caller's tag."""

    op: str
    where: str
    tag: object


def _is_sync(func, args, kwargs) -> bool:
    name = func._schema.name
    if name in _ALWAYS:
        return True
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        # A boolean mask is turned into indices with nonzero(): the output size depends on the data.
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))
    if name == "aten::repeat_interleave" and "output_size" not in kwargs:
        return len(args) < 4 or args[3] is None
    if name in ("aten::_to_copy", "aten::copy_"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst_device = (args[0].device if name == "aten::copy_"
                      else kwargs.get("device") or getattr(src, "device", None))
        return (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                and torch.device(dst_device).type == "cpu")
    return False


def _caller(skip_dirs: tuple[str, ...]) -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if path == __file__ or path.startswith(skip_dirs):
            continue
        return f"{path}:{frame.lineno} ({frame.name})"
    return "<torch internals>"


class HostSyncCounter(TorchDispatchMode):
    """Record every host synchronisation while active: `with HostSyncCounter() as c: ...; c.events`.

    `tag` (a callable) labels each event, e.g. with the training step it happened in, so that a
    caller can count the events of a range of steps (`count(lambda tag: lo <= tag < hi)`).
    """

    def __init__(self, tag: Callable[[], object] | None = None):
        super().__init__()
        self.tag = tag or (lambda: None)
        self.events: list[SyncEvent] = []
        self._skip = (_TORCH_DIR,)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.events.append(SyncEvent(func._schema.name, _caller(self._skip), self.tag()))
        return func(*args, **kwargs)

    def count(self, where: Callable[[object], bool] | None = None) -> int:
        """Number of events whose tag satisfies `where` (all events without it)."""
        return sum(1 for e in self.events if where is None or where(e.tag))

    def by_location(self, where: Callable[[object], bool] | None = None) -> dict[str, int]:
        """{"file:line (function) [op]": count}, most frequent first."""
        counts = Counter(f"{_short(e.where)} [{e.op}]" for e in self.events if where is None or where(e.tag))
        return dict(counts.most_common())


def _short(where: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for prefix in (root + os.sep, *(p + os.sep for p in sys.path if p and "site-packages" in p)):
        if where.startswith(prefix):
            return where[len(prefix):]
    return where


@contextlib.contextmanager
def cuda_sync_debug(mode: str = "error"):
    """`torch.cuda.set_sync_debug_mode(mode)` inside the block ("warn", "error"); no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


__all__ = ["HostSyncCounter", "SyncEvent", "cuda_sync_debug"]
