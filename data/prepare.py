"""`adm prepare-imagenet`: write an ImageNet source as deterministic, resumable WebDataset shards.

Determinism is what makes resume safe: the sample order (sorted listing, then a fixed-seed shuffle so
every shard mixes classes), the keys, and the split into shards (planned up front from file sizes)
depend only on the source and the options. Each shard is therefore a pure function of its planned
sample range: workers write whole shards independently, in any order, and a rerun after a crash
rewrites a missing shard byte for byte. Tar members carry fixed metadata (mtime 0, uid/gid 0).

OUT/
  train-000000.tar ...         shards (temp name, fsync, rename: a partial shard is never trusted)
  manifest.json                written last: counts, classes, shards (name, count, sha256), skipped
  .prepare/plan.json           options + source fingerprint + shard boundaries (resume and refusal)
  .prepare/train-000000.tar.json  per-shard record, written after its shard
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.classes import imagenet_wnids
from runtime.files import atomic_open, atomic_write_json
from data.shards import MANIFEST_FORMAT, MANIFEST_NAME
from data.sources import Source, SourceItem, read_item, scan_source
from data.transforms import ImageTooLarge, _halve_while_large, center_crop_arr, open_image

log = logging.getLogger("data.prepare")

STATE_DIR = ".prepare"
PLAN_NAME = "plan.json"
DEFAULT_SHARD_SIZE = 256 << 20
SHUFFLE_SEED = 0
_TAR_BLOCK = 512
RESIZE_FORMATS = ("png", "npy", "jpg")
_EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "PPM": "ppm", "TIFF": "tiff"}


# -- planning -----------------------------------------------------------------------------------
def _sanitize(text: str) -> str:
    # WebDataset keys end at the first dot and must be one tar path component here.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def assign_keys(items: list[SourceItem]) -> list[str]:
    """Unique WebDataset keys, in listing order: the file stem, prefixed by its class when needed."""
    keys, seen = [], set()
    for it in items:
        stem = os.path.basename(it.name).split(".", 1)[0]
        key = _sanitize(stem if stem.startswith(it.cls) or "/" not in it.name else f"{it.cls}_{stem}")
        unique, n = key, 1
        while unique in seen:
            n += 1
            unique = f"{key}_{n}"
        seen.add(unique)
        keys.append(unique)
    return keys


def _padded(n: int) -> int:
    return (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def plan_shards(sizes: list[int], shard_size: int | None, samples_per_shard: int | None) -> list[int]:
    """Samples per shard, in order: a new shard starts when the next sample would pass shard_size bytes."""
    if samples_per_shard:
        n = len(sizes)
        return [min(samples_per_shard, n - i) for i in range(0, n, samples_per_shard)]
    counts: list[int] = []
    current = count = 0
    for size in sizes:
        # image member + .cls + .wnid: three headers and three padded payloads.
        estimate = 3 * _TAR_BLOCK + _padded(size) + 2 * _TAR_BLOCK
        if count and current + estimate > shard_size:
            counts.append(count)
            current = count = 0
        current += estimate
        count += 1
    if count:
        counts.append(count)
    return counts


def make_plan(source: Source, options: dict[str, Any]) -> dict[str, Any]:
    """The whole job, decided before anything is written: sample order, keys, shard boundaries."""
    keys = assign_keys(source.items)
    order = list(range(len(source.items)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    counts = plan_shards([source.items[i].size for i in order], options["shard_size"], options["samples_per_shard"])
    return {
        "options": options,
        "source_fingerprint": source.fingerprint(),
        "num_items": len(order),
        "shard_counts": counts,
        "_order": order,
        "_keys": keys,
    }


def shard_name(split: str, index: int) -> str:
    """`train-000000.tar`-style shard file name."""
    return f"{split}-{index:06d}.tar"


# -- writing one shard --------------------------------------------------------------------------
class _HashingWriter:
    """File-like wrapper computing sha256 and size of what tarfile writes."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.sha, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _check_image(data: bytes) -> tuple[Image.Image, str]:
    img = open_image(data)  # refuses oversized images before decoding a pixel
    fmt, mode = img.format, img.mode
    if fmt == "JPEG":
        # DCT-domain downscale: still entropy-decodes every byte, so truncation is caught, 4-8x faster.
        img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    img.load()
    return img, f"{fmt}:{mode}"


def _encode_resized(data: bytes, short_side: int | None, crop: int | None, fmt: str) -> tuple[bytes, str]:
    img = open_image(data)
    img.load()
    img = img.convert("RGB") if img.mode != "RGB" else img
    if crop:
        # ADM's whole centre crop, done once: the loader's center_crop_arr of an SxS image is the identity.
        img = Image.fromarray(center_crop_arr(img, crop))
    else:
        # Only ADM's own BOX halvings: the loader's crop continues from here exactly as from the
        # original, for every image_size <= short_side.
        img = _halve_while_large(img, short_side)
    out = io.BytesIO()
    if fmt == "npy":
        # Raw pixels: no decoding at all when loading; about the size of a PNG of a photo.
        np.save(out, np.asarray(img), allow_pickle=False)
    elif fmt == "png":
        img.save(out, format="PNG", compress_level=6)
    else:
        img.save(out, format="JPEG", quality=95)
    return out.getvalue(), fmt


def _reason(err: Exception) -> str:
    # Stable text (no object addresses), so a rerun writes a byte-identical manifest.
    if isinstance(err, UnidentifiedImageError):
        return "not an image (format not recognised)"
    if isinstance(err, ImageTooLarge):
        return str(err)
    if isinstance(err, Image.DecompressionBombError):
        return f"image too large ({err})"
    return "not a decodable image: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one shard from its planned items and return its record (runs in a worker process)."""
    out, name, options = Path(task["out"]), task["name"], task["options"]
    skipped: list[dict[str, str]] = []
    classes: Counter = Counter()
    formats: Counter = Counter()
    with contextlib.ExitStack() as stack:
        src_tar = stack.enter_context(open(task["src"], "rb")) if task["src_is_tar"] else None
        handle = stack.enter_context(atomic_open(out / name, "wb"))
        writer = _HashingWriter(handle)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, item, label in task["samples"]:
                try:
                    data = read_item(task["src"], item, src_tar)
                except OSError as err:
                    skipped.append({"path": item.name, "reason": f"unreadable: {err}"})
                    continue
                try:
                    _, kind = _check_image(data)
                except Exception as err:  # anything PIL cannot fully decode is not a usable image
                    skipped.append({"path": item.name, "reason": _reason(err)})
                    continue
                fmt = kind.split(":")[0]
                if options["resize_short_side"] or options["center_crop"]:
                    data, ext = _encode_resized(data, options["resize_short_side"], options["center_crop"], options["resize_format"])
                else:
                    ext = _EXT_BY_FORMAT.get(fmt, fmt.lower())
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(label).encode())
                _add_member(tar, f"{key}.wnid", item.cls.encode())
                classes[item.cls] += 1
                formats[kind] += 1
    record = {
        "name": name,
        "count": sum(classes.values()),
        "sha256": writer.sha.hexdigest(),
        "bytes": writer.size,
        "classes": dict(sorted(classes.items())),
        "formats": dict(sorted(formats.items())),
        "skipped": skipped,
    }
    atomic_write_json(out / STATE_DIR / f"{name}.json", record)
    return record


# -- the job ------------------------------------------------------------------------------------
def _options(split, val_labels, shard_size, samples_per_shard, resize_short_side, center_crop, resize_format, allow_custom_classes, src):
    labels_sha = hashlib.sha256(Path(val_labels).read_bytes()).hexdigest() if val_labels and Path(val_labels).is_file() else None
    return {
        "source": str(Path(src).resolve()),
        "split": split,
        "val_labels_sha256": labels_sha,
        "shard_size": None if samples_per_shard else int(shard_size),
        "samples_per_shard": int(samples_per_shard) if samples_per_shard else None,
        "resize_short_side": int(resize_short_side) if resize_short_side else None,
        "center_crop": int(center_crop) if center_crop else None,
        "resize_format": resize_format if resize_short_side or center_crop else None,
        "allow_custom_classes": bool(allow_custom_classes),
        "shuffle_seed": SHUFFLE_SEED,
    }


def _refuse_other_options(out: Path, plan_path: Path, options: dict[str, Any]) -> None:
    if plan_path.exists():
        saved = json.loads(plan_path.read_text())["options"]
        diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in options.items() if saved.get(k) != v]
        if diffs:
            raise ValueError(
                f"{out} holds shards made with other options ({'; '.join(diffs)}). Nothing was changed: "
                "use a new output folder, or rerun with the same options to complete it"
            )
    elif any(out.glob("*.tar")) or (out / MANIFEST_NAME).exists():
        raise ValueError(
            f"{out} already holds shards or a manifest not made by this tool's resumable writer; nothing was "
            "changed: choose an empty or new output folder"
        )


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another prepare-imagenet is writing to {state_dir.parent}; wait for it to finish") from None
        yield


def _remove_stale_temps(out: Path) -> None:
    # Temp files of a killed run (atomic_open names them ".<target>.<random>.tmp"): never trusted.
    for folder in (out, out / STATE_DIR):
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _shard_done(out: Path, name: str) -> dict[str, Any] | None:
    record_path = out / STATE_DIR / f"{name}.json"
    shard_path = out / name
    if not (record_path.exists() and shard_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("bytes") == shard_path.stat().st_size else None


def _build_manifest(source: Source, plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    class_counts: Counter = Counter()
    formats: Counter = Counter()
    skipped = list(source.skipped)
    for rec in records:
        class_counts.update(rec["classes"])
        formats.update(rec["formats"])
        skipped.extend(rec["skipped"])
    class_list = source.class_list
    non_rgb = sum(n for kind, n in formats.items() if not kind.endswith(":RGB"))
    return {
        "format": MANIFEST_FORMAT,
        "split": plan["options"]["split"],
        "num_samples": sum(rec["count"] for rec in records),
        "num_classes": len(class_list),
        "class_list": class_list,
        "classes": {c: class_counts[c] for c in class_list if class_counts[c]},
        "missing_classes": [c for c in class_list if not class_counts[c]],
        "imagenet_classes": class_list == imagenet_wnids(),
        "shards": [{"name": r["name"], "count": r["count"], "sha256": r["sha256"], "bytes": r["bytes"]} for r in records],
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "formats": dict(sorted(formats.items())),
        "converted_to_rgb_when_loaded": non_rgb,
        "layout": source.layout,
        "options": plan["options"],
        "notes": source.notes,
    }


def prepare_imagenet(
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    val_labels: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    samples_per_shard: int | None = None,
    workers: int = 1,
    resize_short_side: int | None = None,
    center_crop: int | None = None,
    resize_format: str = "png",
    allow_custom_classes: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert an ImageNet source to WebDataset shards in `out`; return the manifest.

    Resumable: a rerun completes only the missing shards (byte-identical to an uninterrupted run);
    a rerun of a finished job returns the existing manifest; a rerun with other options into the same
    `out` raises ValueError and changes nothing. See the module docstring for the layout of `out`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if samples_per_shard is not None and int(samples_per_shard) < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not samples_per_shard and int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    if resize_short_side is not None and int(resize_short_side) < 1:
        raise ValueError(f"resize_short_side must be a positive number of pixels, got {resize_short_side}")
    if center_crop is not None and int(center_crop) < 1:
        raise ValueError(f"center_crop must be a positive number of pixels, got {center_crop}")
    if resize_short_side and center_crop:
        raise ValueError("choose one of resize_short_side (keeps random crops possible) and center_crop (one size only)")
    if resize_format not in RESIZE_FORMATS:
        raise ValueError(f"resize_format must be 'png' or 'npy' (exact) or 'jpg' (smaller, lossy), got {resize_format!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not Path(src).exists():
        raise FileNotFoundError(f"source {src} does not exist: pass ILSVRC2012_img_train.tar, a folder of class folders, or validation images")
    if val_labels is not None and not Path(val_labels).is_file():
        raise FileNotFoundError(f"--val-labels file {val_labels} does not exist")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    options = _options(
        split, val_labels, shard_size, samples_per_shard, resize_short_side, center_crop, resize_format, allow_custom_classes, src
    )
    state_dir = out / STATE_DIR
    plan_path = state_dir / PLAN_NAME
    if out.exists():
        _refuse_other_options(out, plan_path, options)
        if (out / MANIFEST_NAME).exists() and plan_path.exists():
            manifest = json.loads((out / MANIFEST_NAME).read_text())
            intact = all(
                (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"] for s in manifest["shards"]
            )
            if intact:
                log.info("%s is already complete", out)
                return manifest
            log.info("%s: shards listed in manifest.json are missing or changed; rewriting them", out)
    # Scan (and fail on bad input) before creating anything in `out`.
    source = scan_source(src, split, val_labels, allow_custom_classes)
    plan = make_plan(source, options)
    if not plan["num_items"]:
        raise ValueError(f"{src} holds no images")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(state_dir):
        _refuse_other_options(out, plan_path, options)
        saved_plan = {k: v for k, v in plan.items() if not k.startswith("_")}
        if plan_path.exists():
            previous = json.loads(plan_path.read_text())
            if previous != saved_plan:
                raise ValueError(
                    f"the source {src} changed since the shards in {out} were planned "
                    f"({previous.get('num_items')} files then, {plan['num_items']} now); nothing was changed: "
                    "use a new output folder"
                )
        else:
            atomic_write_json(plan_path, saved_plan)
        _remove_stale_temps(out)
        records = _run_shards(src, source, plan, out, split, workers, progress)
        manifest = _build_manifest(source, plan, records)
        atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _tasks(src, source: Source, plan: dict[str, Any], out: Path, split: str) -> Iterator[dict[str, Any]]:
    order, keys = plan["_order"], plan["_keys"]
    label_of = {c: i for i, c in enumerate(source.class_list)}
    start = 0
    for index, count in enumerate(plan["shard_counts"]):
        picked = order[start : start + count]
        start += count
        yield {
            "src": str(src),
            "src_is_tar": Path(src).is_file(),
            "out": str(out),
            "name": shard_name(split, index),
            "options": plan["options"],
            "samples": [(keys[i], source.items[i], label_of[source.items[i].cls]) for i in picked],
        }


def _run_shards(src, source, plan, out: Path, split: str, workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for task in _tasks(src, source, plan, out, split):
        done = _shard_done(out, task["name"])
        if done is not None:
            records[task["name"]] = done
        else:
            todo.append(task)
    total = len(plan["shard_counts"])
    if len(todo) < total:
        log.info("resuming: %d of %d shards are already complete", total - len(todo), total)
    bar = tqdm(total=total, initial=total - len(todo), unit="shard", desc="prepare-imagenet", disable=not progress)
    every = max(1, total // 20)

    def finished(record: dict[str, Any]) -> None:
        records[record["name"]] = record
        bar.update(1)
        if not progress and (len(records) % every == 0 or len(records) == total):
            log.info("%d/%d shards written", len(records), total)  # for batch logs without a terminal

    with bar:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                finished(write_shard(task))
        else:
            # fork, not spawn: works when the caller's __main__ is not importable (stdin, notebooks).
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("fork"))
            try:
                futures = [pool.submit(write_shard, task) for task in todo]
                for future in as_completed(futures):
                    finished(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # stop queued shards; running ones finish cleanly
                raise
            pool.shutdown(wait=True)
    return [records[shard_name(split, i)] for i in range(total)]
