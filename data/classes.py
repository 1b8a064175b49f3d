"""The ImageNet-1k class list: the sorted 1000 ILSVRC2012 WNIDs give labels 0..999.

ADM (and every ImageNet codebase that sorts its class folders) labels classes by the position of
their WNID in sorted order, so a label only means something together with this list. The list ships
with the package (`imagenet_classes.txt`: "WNID<TAB>names") so no download is needed.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

NUM_IMAGENET_CLASSES = 1000
_WNID_RE = re.compile(r"^n\d{8}$")


def is_wnid(name: str) -> bool:
    """True if `name` looks like a WordNet id (`n` followed by 8 digits)."""
    return bool(_WNID_RE.match(name))


@functools.lru_cache(maxsize=1)
def _load() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    wnids, names = [], []
    for line in text.splitlines():
        wnid, name = line.split("\t", 1)
        wnids.append(wnid)
        names.append(name)
    # Internal invariant: the shipped file is the sorted ILSVRC2012 list.
    assert len(wnids) == NUM_IMAGENET_CLASSES and wnids == sorted(set(wnids))
    return tuple(wnids), tuple(names)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet WNIDs in label order (sorted): index i is label i."""
    return list(_load()[0])


def imagenet_names() -> list[str]:
    """Human-readable names ("tench, Tinca tinca", ...) in label order."""
    return list(_load()[1])


@functools.lru_cache(maxsize=1)
def imagenet_index() -> dict[str, int]:
    """WNID -> label (0..999)."""
    return {w: i for i, w in enumerate(_load()[0])}


def class_name(label: int) -> str:
    """Short human-readable name of ImageNet label `label` (the first synonym)."""
    if not 0 <= int(label) < NUM_IMAGENET_CLASSES:
        raise ValueError(f"ImageNet label {label} is outside 0..999")
    return _load()[1][int(label)].split(",")[0]
