"""Where shards are and what they hold: resolving a shard argument, opening a shard, reading samples.

A shard argument may be a folder written by `adm prepare-imagenet` (its `manifest.json` lists the
shards and classes), a path to such a manifest, a glob (`/d/train-*.tar`), a brace pattern
(`/d/train-{000000..000146}.tar`), a URL (`pipe:aws s3 cp s3://b/x.tar -`, `s3://b/x.tar` through
fsspec, `https://...`), or a list of any of these.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import braceexpand

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "adm-shards/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "npy", "webp", "bmp", "gif", "ppm", "tif", "tiff")


class ShardReadError(OSError):
    """A shard could not be opened or read to its end."""


@dataclass
class ShardSet:
    """Resolved shards: their URLs (in manifest or sorted order) and the manifest, if one was found."""

    urls: list[str]
    manifest: dict[str, Any] | None = None
    root: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Class names (WNIDs) in label order: the manifest's list, else the 1000 ImageNet WNIDs."""
        if self.manifest and self.manifest.get("class_list"):
            return list(self.manifest["class_list"])
        from data.classes import imagenet_wnids

        return imagenet_wnids()


def is_url(spec: str) -> bool:
    """True for `pipe:` commands and `scheme://` URLs (not `file://`)."""
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def _strip_file_scheme(spec: str) -> str:
    return spec[len("file://") :] if spec.startswith("file://") else spec


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a `manifest.json` (local path or fsspec URL)."""
    path = str(path)
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as handle:
                manifest = json.loads(handle.read())
        else:
            manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path} does not exist: point at a folder made by `adm prepare-imagenet`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {path} is not valid JSON ({err}); re-run `adm prepare-imagenet` to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
            manifest.get("shards"), list):
        raise ValueError(f"{path} is not a shard manifest written by `adm prepare-imagenet` (format {MANIFEST_FORMAT})")
    for shard in manifest["shards"]:
        # A manifest names files of its own folder: nothing else is opened through it.
        name = shard.get("name") if isinstance(shard, dict) else None
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or ":" in name or any(ord(c) < 32 for c in name)):
            raise ValueError(f"{path} lists a shard named {name!r}: a manifest may only name files in its own folder")
        if not isinstance(shard.get("count", 0), int):
            raise ValueError(f"{path}: shard {name} has a non-integer count {shard.get('count')!r}")
    return manifest


def _from_manifest(manifest_path: str) -> ShardSet:
    manifest = read_manifest(manifest_path)
    root = manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."
    urls = [f"{root}/{s['name']}" for s in manifest["shards"]]
    if not is_url(root):
        for url in urls:
            if not os.path.exists(url):
                raise FileNotFoundError(
                    f"shard {url} listed in {manifest_path} is missing: re-run `adm prepare-imagenet` to complete the folder"
                )
    counts = {url: int(s["count"]) for url, s in zip(urls, manifest["shards"])}
    return ShardSet(urls=urls, manifest=manifest, root=root, counts=counts)


def _expand_one(spec: str) -> list[str]:
    out: list[str] = []
    for item in braceexpand.braceexpand(spec):
        if is_url(item):
            out.append(item)
            continue
        item = _strip_file_scheme(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no shard matches {item!r}: check the path or pattern")
            out.extend(matches)
        elif not os.path.exists(item):
            raise FileNotFoundError(f"shard {item} does not exist: check the path (or pass the folder holding manifest.json)")
        else:
            out.append(item)
    return out


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    """Turn a shard argument (folder, manifest, glob, brace pattern, URL or list) into a ShardSet."""
    if isinstance(shards, (str, os.PathLike)):
        spec = _strip_file_scheme(os.fspath(shards))
        if spec.endswith(MANIFEST_NAME):
            return _from_manifest(spec)
        if is_url(spec) and spec.endswith("/"):
            return _from_manifest(spec + MANIFEST_NAME)
        if not is_url(spec) and os.path.isdir(spec):
            manifest_path = os.path.join(spec, MANIFEST_NAME)
            if os.path.exists(manifest_path):
                return _from_manifest(manifest_path)
            urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not urls:
                raise FileNotFoundError(
                    f"folder {spec} holds neither {MANIFEST_NAME} nor *.tar shards: run `adm prepare-imagenet SRC {spec}` first"
                )
            return ShardSet(urls=urls, root=spec)
        urls = _expand_one(spec)
    else:
        urls = []
        for item in shards:
            urls.extend(resolve_shards(item).urls)
    if not urls:
        raise ValueError("the shard list is empty: pass a folder, a pattern or a list of shard paths")
    # A list of local shards from one prepared folder still gets that folder's class list.
    manifest = None
    root = None
    counts: dict[str, int] = {}
    parents = {os.path.dirname(os.path.abspath(u)) for u in urls if not is_url(u)}
    if len(parents) == 1 and not any(is_url(u) for u in urls):
        root = parents.pop()
        manifest_path = os.path.join(root, MANIFEST_NAME)
        if os.path.exists(manifest_path):
            manifest = read_manifest(manifest_path)
            by_name = {s["name"]: int(s["count"]) for s in manifest["shards"]}
            counts = {u: by_name[os.path.basename(u)] for u in urls if os.path.basename(u) in by_name}
    return ShardSet(urls=urls, manifest=manifest, root=root, counts=counts)


def open_shard(url: str) -> BinaryIO:
    """Open a shard for streaming: local path, `pipe:CMD`, fsspec URL (s3://, gs://, ...) or http(s)."""
    if url.startswith("pipe:") or url.startswith(("http://", "https://")):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if is_url(url):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is installed with webdataset's extras here
            raise ValueError(f"cannot open {url}: install fsspec (and the filesystem's client, e.g. s3fs)") from None
        return fsspec.open(url, "rb").open()
    return open(_strip_file_scheme(url), "rb", buffering=1 << 20)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's naming rule: key = path up to the first dot of the base name; the rest is the field."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as dicts `{"__key__", "__url__", field: bytes, ...}`, undecoded.

    Any failure to open or read the tar to its end raises ShardReadError naming the shard.
    """
    try:
        stream = open_shard(url)
    except (OSError, ValueError) as err:
        raise ShardReadError(f"cannot open shard {url}: {err}") from err
    current: dict[str, Any] | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not ext:
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardReadError(f"cannot read shard {url}: {err}") from err


def image_field(sample: dict[str, Any]) -> str | None:
    """Name of the sample's image field (`jpg`, `png`, ...) or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None
