"""Build a reference batch from shards for a custom dataset: `adm make-reference SHARDS --size S`.

Like ADM's `VIRTUAL_imagenet*.npz`: `arr_0` holds `num_images` images (uint8, ADM's centre crop)
and `arr_1` their labels; `mu, sigma, mu_s, sigma_s` are Inception statistics of every image in the
shards. Which images land in `arr_0` is decided by a hash of (seed, sample key), so the file is the
same on one process or many (under torchrun each rank reads every world_size-th shard).
"""
from __future__ import annotations

import hashlib
import heapq
import time

import numpy as np
import torch
import torch.distributed as dist

from evaluation import io as eio
from evaluation.metrics import FeatureStats


def _priority(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def make_reference(shards, out, image_size: int, num_images: int = 10000, stats: bool = True,
                   inception_weights=None, network=None, batch_size: int = 100, seed: int = 0,
                   device=None, log=print) -> dict:
    """Write a reference batch to `out`; returns a summary (`num_images`, `num_seen`, `seconds`).

    `stats=False` writes images and labels only (statistics are then computed at evaluation time).
    `network` overrides the Inception FeatureNetwork (tests). Distributed: the caller sets up the
    process group (`runtime.distributed.setup()`) and calls this on every rank.
    """
    from evaluation.evaluate import default_device, no_tf32, process_group_position
    from evaluation.shard_images import iter_shard_images, shard_urls

    if num_images < 1:
        raise ValueError(f"--num-images must be positive, got {num_images}")
    if image_size < 8:
        raise ValueError(f"--size must be at least 8 pixels, got {image_size}")
    shard_urls(shards)  # a wrong path fails here, before the network is loaded
    t0 = time.perf_counter()
    rank, world = process_group_position()
    device = torch.device(device) if device is not None else default_device()
    with no_tf32():
        net = None
        if stats:
            from evaluation.features import inception_network

            net = network or inception_network(weights=inception_weights, device=device)
        pool = FeatureStats(net.pool_dim, net.device) if net else None
        spatial = FeatureStats(net.spatial_dim, net.device) if net else None
        kept: list[tuple[int, str, np.ndarray, int | None]] = []  # max-heap by -priority
        batch: list[np.ndarray] = []
        seen = 0

        def flush():
            if net is not None and batch:
                feats = net(np.stack(batch))
                pool.update(feats.pool)
                spatial.update(feats.spatial)
            batch.clear()

        for key, image, label in iter_shard_images(shards, image_size, rank, world):
            seen += 1
            item = (-_priority(seed, key), key, image, label)
            if len(kept) < num_images:
                heapq.heappush(kept, item)
            elif item[0] > kept[0][0]:
                heapq.heapreplace(kept, item)
            if net is not None:
                batch.append(image)
                if len(batch) >= batch_size:
                    flush()
        flush()
        chosen = _select(kept, num_images, rank, world)
        counts = torch.tensor([float(seen)], dtype=torch.float64, device=device)
        tensors = [counts] + ((pool.tensors() + spatial.tensors()) if net else [])
        if world > 1:
            for t in tensors:
                dist.all_reduce(t)
    if counts.item() == 0:
        raise ValueError(f"no images found in {shards}: check that the shards hold image files")
    summary = None
    if rank == 0:
        chosen.sort(key=lambda item: (-item[0], item[1]))
        images = np.stack([c[2] for c in chosen])
        labels = None if any(c[3] is None for c in chosen) else np.array([c[3] for c in chosen], dtype=np.int64)
        stat_arrays = None
        if net is not None:
            mu, sigma = pool.mean_cov()
            mu_s, sigma_s = spatial.mean_cov()
            stat_arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        eio.write_reference_batch(out, images, labels, stat_arrays)
        summary = {"out": str(out), "num_images": len(images), "num_seen": int(counts.item()),
                   "stats": net is not None, "seconds": round(time.perf_counter() - t0, 2)}
        if log:
            log(f"wrote {out}: {len(images)} images of {summary['num_seen']} seen"
                + (", Inception statistics of all of them" if net is not None else ", no statistics"))
    if world > 1:
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


def _select(kept, num_images: int, rank: int, world: int):
    """The globally `num_images` smallest-priority items, collected on rank 0 (None elsewhere)."""
    if world == 1:
        return list(kept)
    # Two steps so only the chosen images travel: priorities first, then the images under the cut.
    priorities = [-item[0] for item in kept]
    everyone = [None] * world
    dist.all_gather_object(everyone, priorities)
    merged = sorted(p for part in everyone for p in part)
    cut = merged[min(num_images, len(merged)) - 1] if merged else -1
    mine = [item for item in kept if -item[0] <= cut]
    bucket = [None] * world if rank == 0 else None
    dist.gather_object(mine, bucket, dst=0)
    if rank != 0:
        return None
    return [item for part in bucket for item in part]
