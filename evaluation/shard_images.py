"""Labelled images from WebDataset shards with ADM's centre-crop preprocessing (for reference batches
and the domain classifier).

Shards are resolved and read by `data.shards` (folder with manifest, glob, brace pattern, URL, list);
each sample's image goes through `data.transforms.center_crop_arr`, the preprocessing ADM applied
before computing its reference statistics.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

LABEL_FIELDS = ("cls", "class", "label")


def _label_of(sample: dict) -> int | None:
    for name in LABEL_FIELDS:
        if name in sample:
            raw = sample[name]
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')} has a "
                                 f"non-integer label {text!r} in field {name!r}") from None
    return None


def shard_urls(shards, rank: int = 0, world_size: int = 1) -> list[str]:
    """The shards this rank reads (every world_size-th, starting at rank)."""
    from data.shards import resolve_shards

    urls = resolve_shards(shards).urls
    return urls[rank::world_size]


def iter_shard_images(shards: str | Sequence[str], image_size: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[str, np.ndarray, int | None]]:
    """Yield `(key, uint8 [S, S, 3] image, label or None)` for every image of this rank's shards."""
    from data.shards import image_field, iter_raw_samples
    from data.transforms import center_crop_arr, decode_image

    for url in shard_urls(shards, rank, world_size):
        for sample in iter_raw_samples(url):
            field = image_field(sample)
            if field is None:
                continue
            image = center_crop_arr(decode_image(sample[field]), image_size)
            yield sample["__key__"], image, _label_of(sample)


def load_shard_arrays(shards, image_size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (or the first `limit`) labelled images of the shards as arrays: uint8 NHWC and int64 labels."""
    images, labels = [], []
    for key, image, label in iter_shard_images(shards, image_size):
        if label is None:
            raise ValueError(f"shard sample {key} has no label field ({', '.join(LABEL_FIELDS)}); a "
                             f"classifier needs labelled shards")
        images.append(image)
        labels.append(label)
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no images found in {shards}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)
