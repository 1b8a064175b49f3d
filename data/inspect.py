"""`adm inspect-shards`: what a folder of shards really holds, read back sample by sample.

Counts per class, classes missing from the class list, duplicate keys, samples that do not decode
or lack a label, shards that cannot be read, disagreements with the manifest (sample counts and
sha256 of local shards), and an optional grid of examples (ADM's centre crop) to look at.
"""
from __future__ import annotations

import io
import math
import os
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from runtime.files import atomic_write_bytes, file_sha256
from data.shards import ShardReadError, image_field, is_url, iter_raw_samples, resolve_shards
from data.transforms import center_crop_arr, decode_image


def _problem(sample: dict[str, Any], num_classes: int) -> str | None:
    field = image_field(sample)
    if field is None:
        return "no image field"
    try:
        label = int(sample.get("cls", b""))
    except ValueError:
        return "missing or non-numeric .cls"
    if not 0 <= label < num_classes:
        return f"label {label} outside 0..{num_classes - 1}"
    try:
        decode_image(sample[field])
    except Exception as err:  # any decoding failure makes the sample unusable
        return f"undecodable image: {err}"
    return None


def inspect_shards(
    shards: Any,
    grid: str | os.PathLike | None = None,
    grid_count: int = 64,
    grid_size: int = 64,
) -> dict[str, Any]:
    """Read every sample of `shards` and return a report dict; write a PNG grid if `grid` is given."""
    shard_set = resolve_shards(shards)
    classes = shard_set.classes
    per_class: Counter = Counter()
    keys: Counter = Counter()
    bad_samples: list[dict[str, str]] = []
    bad_shards: list[dict[str, str]] = []
    count_mismatch: list[dict[str, Any]] = []
    checksum_mismatch: list[str] = []
    sha_of = {}
    if shard_set.manifest and shard_set.root and not is_url(shard_set.root):
        sha_of = {os.path.join(shard_set.root, s["name"]): s.get("sha256") for s in shard_set.manifest["shards"]}
    tiles: list[np.ndarray] = []
    total = 0
    for url in shard_set.urls:
        seen = 0
        try:
            for sample in iter_raw_samples(url):
                seen += 1
                total += 1
                keys[sample["__key__"]] += 1
                problem = _problem(sample, len(classes))
                if problem:
                    bad_samples.append({"shard": url, "key": sample["__key__"], "reason": problem})
                    continue
                per_class[int(sample["cls"])] += 1
                if grid is not None and len(tiles) < grid_count:
                    tiles.append(center_crop_arr(decode_image(sample[image_field(sample)]), grid_size))
        except ShardReadError as err:
            bad_shards.append({"shard": url, "reason": str(err)})
        if sha_of.get(url) and os.path.exists(url) and file_sha256(url) != sha_of[url]:
            checksum_mismatch.append(url)
        expected = shard_set.counts.get(url)
        if expected is not None and expected != seen:
            count_mismatch.append({"shard": url, "manifest": expected, "read": seen})
    report = {
        "shards": len(shard_set.urls),
        "samples": total,
        "good_samples": sum(per_class.values()),
        "num_classes": len(classes),
        "per_class": {classes[i]: per_class[i] for i in sorted(per_class)},
        "missing_classes": [c for i, c in enumerate(classes) if not per_class[i]],
        "duplicate_keys": sorted(k for k, n in keys.items() if n > 1),
        "bad_samples": bad_samples,
        "bad_shards": bad_shards,
        "manifest_count_mismatch": count_mismatch,
        "checksum_mismatch": checksum_mismatch,
        "manifest_samples": shard_set.manifest.get("num_samples") if shard_set.manifest else None,
    }
    if grid is not None:
        if not tiles:
            raise ValueError("no decodable sample to put in the grid")
        report["grid"] = str(grid)
        atomic_write_bytes(grid, _grid_png(tiles))
    return report


def _grid_png(tiles: list[np.ndarray]) -> bytes:
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    size = tiles[0].shape[0]
    canvas = np.full((rows * size, cols * size, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * size : (r + 1) * size, c * size : (c + 1) * size] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def format_report(report: dict[str, Any], max_lines: int = 20) -> str:
    """Human-readable summary of an `inspect_shards` report."""
    lines = [
        f"shards: {report['shards']}   samples: {report['samples']}   good: {report['good_samples']}"
        + (f"   manifest says: {report['manifest_samples']}" if report["manifest_samples"] is not None else ""),
        f"classes present: {len(report['per_class'])} of {report['num_classes']}",
    ]
    counts = list(report["per_class"].values())
    if counts:
        lines.append(f"samples per class: min {min(counts)}, max {max(counts)}, mean {sum(counts) / len(counts):.1f}")
    missing = report["missing_classes"]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        lines.append(f"missing classes ({len(missing)}): {shown}")
    for title, rows in (
        ("duplicate keys", [{"key": k} for k in report["duplicate_keys"]]),
        ("bad samples", report["bad_samples"]),
        ("unreadable shards", report["bad_shards"]),
        ("shards whose count differs from the manifest", report["manifest_count_mismatch"]),
        ("shards whose sha256 differs from the manifest", [{"shard": s} for s in report["checksum_mismatch"]]),
    ):
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines += ["  " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in rows[:max_lines]]
            if len(rows) > max_lines:
                lines.append(f"  ... {len(rows) - max_lines} more")
    if report.get("grid"):
        lines.append(f"grid: {report['grid']}")
    return "\n".join(lines)


def report_is_clean(report: dict[str, Any]) -> bool:
    """True when nothing is wrong (missing classes alone are not an error)."""
    return not (
        report["duplicate_keys"]
        or report["bad_samples"]
        or report["bad_shards"]
        or report["manifest_count_mismatch"]
        or report["checksum_mismatch"]
    )
