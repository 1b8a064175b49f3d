"""Finding the images of an ImageNet source: class folders, the train tar, or validation images.

Layouts (detected, never guessed silently):
- `class-folders`: SRC/<class>/<image> (ImageNet's extracted train set, or val after sorting).
- `train-tar`: ILSVRC2012_img_train.tar, a tar of per-class tars `<wnid>.tar`. Read in place: the
  listing walks tar headers and each image is later read by its byte offset, never unpacked to disk.
- `tar-class-folders`: a tar holding `<class>/<image>` members.
- `val-folder` / `val-tar`: flat validation images plus a label file (`--val-labels`).
The listing is sorted, so the same source always gives the same list.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from data.classes import imagenet_index, imagenet_wnids

LAYOUTS = ("class-folders", "train-tar", "tar-class-folders", "val-folder", "val-tar")


@dataclass(frozen=True, slots=True)  # 1.28M of these for ImageNet: keep them small
class SourceItem:
    """One source file: where it is (`offset` is -1 for a plain file) and its class."""

    name: str  # path relative to SRC (for tars: "<inner>.tar/<member>" or the member path)
    cls: str  # class name (a WNID for ImageNet)
    size: int
    offset: int = -1  # byte offset of the data inside the SRC tar; -1: a file under SRC


@dataclass
class Source:
    """A scanned source: sorted items, the class list, and what was left out and why."""

    path: str
    layout: str
    items: list[SourceItem]
    class_list: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 of the listing (names, sizes, classes): detects a source that changed between runs."""
        digest = hashlib.sha256()
        for it in self.items:
            digest.update(f"{it.name}\t{it.size}\t{it.cls}\n".encode())
        return digest.hexdigest()


class _Window:
    """A read-only, seekable view of bytes [start, start+size) of a file: a tar inside a tar."""

    def __init__(self, handle: BinaryIO, start: int, size: int):
        self.handle, self.start, self.size, self.pos = handle, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.handle.seek(self.start + self.pos)
        data = self.handle.read(n)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _check_classes(found: list[str], allow_custom: bool, where: str) -> list[str]:
    if allow_custom:
        return sorted(found)
    known = imagenet_index()
    bad = [c for c in found if c not in known]
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{where}: {len(bad)} class name(s) are not among the 1000 ImageNet WNIDs: {shown}. "
            "Fix or remove them, or pass --allow-custom-classes to build the class list from the source"
        )
    return imagenet_wnids()


def _empty_classes_error(empty: list[str], where: str) -> ValueError:
    shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
    return ValueError(
        f"{where}: class(es) {shown} hold no files (an incomplete download or extraction?). "
        "Complete them, or remove them to have the classes reported as missing"
    )


def _scan_class_folders(src: Path, allow_custom: bool) -> Source:
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_list = _check_classes([p.name for p in class_dirs], allow_custom, str(src))
    items: list[SourceItem] = []
    empty = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and not _hidden(str(p.relative_to(class_dir)))
        )
        if not files:
            empty.append(class_dir.name)
        for f in files:
            items.append(SourceItem(str(f.relative_to(src)), class_dir.name, f.stat().st_size))
    if empty:
        raise _empty_classes_error(empty, str(src))
    return Source(str(src), "class-folders", items, class_list)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not taken as a source file, or None when it is (directories: never listed)."""
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r}), not a file"
    if not member.isfile():
        return "not a regular file (device, fifo or other special member)"
    name = member.name
    if name.startswith("/"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "a path with '..' (leaves the archive's folder)"
    if any(part == "" for part in parts[:-1]) or not parts[-1]:
        return "an empty path component"
    if any(ord(c) < 32 for c in name):
        return "a name with control characters"
    if _hidden(name):
        return "a hidden file (a name starting with '.')"
    return None


def _tar_members(handle: BinaryIO, where: str, prefix: str = "") -> tuple[list[tarfile.TarInfo], list[dict[str, str]]]:
    """The regular-file members of a tar, and every other non-directory member as a `skipped` entry."""
    files, skipped = [], []
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for m in tar:
                if m.isdir():
                    continue
                problem = _member_problem(m)
                if problem is None:
                    files.append(m)
                else:
                    skipped.append({"path": prefix + m.name, "reason": f"tar member skipped: {problem}"})
    except tarfile.ReadError as err:
        raise ValueError(f"{where} is not a readable uncompressed tar ({err}); decompress it or pass a folder") from None
    return files, skipped


def _scan_tar(src: Path, allow_custom: bool, val_labels: dict[str, str] | None) -> Source:
    with open(src, "rb") as handle:
        visible, skipped = _tar_members(handle, str(src))
        if not visible:
            raise ValueError(f"{src} holds no files: is it the right tar?")
        if val_labels is None and all(m.name.endswith(".tar") for m in visible):
            # ILSVRC2012_img_train.tar: one tar per class, named <wnid>.tar.
            classes = [os.path.basename(m.name)[: -len(".tar")] for m in visible]
            class_list = _check_classes(classes, allow_custom, str(src))
            items, empty = [], []
            for outer, cls in sorted(zip(visible, classes), key=lambda x: x[1]):
                inner, dropped = _tar_members(_Window(handle, outer.offset_data, outer.size), f"{src}:{outer.name}",
                                              prefix=f"{outer.name}/")
                skipped += dropped
                inner = sorted(inner, key=lambda m: m.name)
                if not inner:
                    empty.append(cls)
                for m in inner:
                    items.append(SourceItem(f"{outer.name}/{m.name}", cls, m.size, outer.offset_data + m.offset_data))
            if empty:
                raise _empty_classes_error(empty, str(src))
            return Source(str(src), "train-tar", items, class_list, skipped)
        if val_labels is None and all("/" in m.name for m in visible):
            classes = sorted({m.name.split("/", 1)[0] for m in visible})
            class_list = _check_classes(classes, allow_custom, str(src))
            items = [
                SourceItem(m.name, m.name.split("/", 1)[0], m.size, m.offset_data)
                for m in sorted(visible, key=lambda m: m.name)
            ]
            return Source(str(src), "tar-class-folders", items, class_list, skipped)
        if val_labels is None:
            raise ValueError(
                f"unknown layout in {src}: expected a tar of per-class tars (ILSVRC2012_img_train.tar) or "
                "<class>/<image> members; for flat validation images pass --split val --val-labels FILE"
            )
        entries = [(m.name, m.size, m.offset_data) for m in sorted(visible, key=lambda m: m.name)]
        source = _label_flat(src, "val-tar", entries, val_labels, allow_custom)
        source.skipped = skipped + source.skipped
        return source


def _label_flat(src: Path, layout: str, entries, labels: dict[str, str], allow_custom: bool) -> Source:
    items, skipped = [], []
    for name, size, offset in entries:
        stem = os.path.basename(name).split(".", 1)[0]
        cls = labels.get(stem)
        if cls is None:
            skipped.append({"path": name, "reason": "no label in the --val-labels file"})
            continue
        items.append(SourceItem(name, cls, size, offset))
    if not items:
        raise ValueError(
            f"none of the {len(entries)} files in {src} has a label in the --val-labels file: "
            "check that the file names (without extension) match"
        )
    class_list = _check_classes(sorted({it.cls for it in items}), allow_custom, "--val-labels")
    notes = []
    unused = len(set(labels) - {os.path.basename(n).split(".", 1)[0] for n, _, _ in entries})
    if unused:
        notes.append(f"{unused} labels in the --val-labels file have no image in {src}")
    return Source(str(src), layout, items, class_list, skipped, notes)


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """Read a validation label file into {image stem: class}.

    Accepted: Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, first token is the WNID);
    lines `NAME WNID` or `NAME,WNID`; lines `NAME LABEL` with LABEL an index 0..999 in sorted-WNID
    order (Caffe's val.txt). The devkit's ILSVRC2012_validation_ground_truth.txt (one number per
    line, in the devkit's own class order) is refused with a hint, since its numbers are not labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--val-labels file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--val-labels file {path} is empty")
    labels: dict[str, str] = {}
    wnids = imagenet_wnids()
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.reader(io.StringIO("\n".join(lines[1:]))):
            if len(row) >= 2 and row[1].split():
                labels[row[0].split(".", 1)[0]] = row[1].split()[0]
        return labels
    if all(re.fullmatch(r"\d+", ln) for ln in lines[:100]):
        raise ValueError(
            f"{path} looks like the devkit's ILSVRC2012_validation_ground_truth.txt: its numbers follow the devkit's "
            "own class order, not the sorted WNIDs. Use Kaggle's LOC_val_solution.csv or a file of 'NAME WNID' lines"
        )
    for number, line in enumerate(lines, 1):
        parts = re.split(r"[,\s]+", line)
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'NAME WNID' or 'NAME,WNID', got {line!r}")
        name, label = parts[0], parts[1]
        if re.fullmatch(r"\d+", label):
            index = int(label)
            if index >= len(wnids):
                raise ValueError(f"{path}:{number}: label {index} is outside 0..999")
            label = wnids[index]
        labels[os.path.basename(name).split(".", 1)[0]] = label
    return labels


def scan_source(
    src: str | os.PathLike,
    split: str = "train",
    val_labels: str | os.PathLike | None = None,
    allow_custom_classes: bool = False,
) -> Source:
    """List a source's images (sorted) and its class list; raises a clear error for bad layouts."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"source {src} does not exist: pass ILSVRC2012_img_train.tar, a folder of class folders, or validation images")
    if split == "val" and val_labels is None and path.is_dir() and not any(p.is_dir() for p in path.iterdir()):
        raise ValueError(f"{src} holds flat validation images: pass --val-labels FILE to give their classes")
    labels = read_val_labels(val_labels) if val_labels is not None else None
    if path.is_file():
        return _scan_tar(path, allow_custom_classes, labels)
    if labels is not None:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        entries = [(p.name, p.stat().st_size, -1) for p in files]
        if not entries:
            raise ValueError(f"{src} holds no files to label with --val-labels")
        return _label_flat(path, "val-folder", entries, labels, allow_custom_classes)
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return _scan_class_folders(path, allow_custom_classes)
    raise ValueError(
        f"unknown layout in {src}: expected class folders (SRC/<wnid>/<image>), ILSVRC2012_img_train.tar, "
        "or flat validation images with --val-labels FILE"
    )


def read_item(src: str, item: SourceItem, handle: BinaryIO | None = None) -> bytes:
    """The bytes of one source item (`handle`: the SRC tar, opened once by the caller)."""
    if item.offset < 0:
        return (Path(src) / item.name).read_bytes()
    assert handle is not None
    handle.seek(item.offset)
    return handle.read(item.size)
