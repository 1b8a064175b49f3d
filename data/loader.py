"""Streaming, resumable ImageNet loader over WebDataset shards, split by node and by worker.

Why it is built this way: exact resume. Everything a reader sees is a pure function of
(seed, epoch, rank, world_size, worker): the epoch's shard order comes from the seed (the same on
every rank, so ranks partition the shards), each reader's shuffle buffer has its own seeded RNG, and
each sample's crop/flip RNG is seeded from (seed, epoch, key). A reader's position is therefore just
(epoch, raw samples consumed in that epoch). Batches carry their reader's position back to the main
process, which records it only when the batch is handed to the caller; on resume each reader replays
its epoch's shards through the shuffle buffer *without decoding* up to that position. DataLoader
hands out batches round-robin over its workers, so a resume also rotates which worker goes first.

    loader = ShardLoader("/data/imagenet-shards", image_size=64, batch_size=256,
                         rank=rank, world_size=world, num_workers=8, seed=0)
    for batch in loader:           # infinite
        batch["images"], batch["labels"], batch["keys"]
        ...; ckpt["data"] = loader.state_dict()
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import ShardReadError, image_field, iter_raw_samples, resolve_shards
from data.transforms import (
    center_crop_arr,
    decode_image,
    maybe_flip,
    random_crop_arr,
    simplejpeg_matches_pillow,
    to_float_chw,
)

log = logging.getLogger("data.loader")

MODES = ("center", "random-crop")
OUTPUTS = ("float", "uint8")
DECODERS = ("auto", "pil", "simplejpeg", "pil-draft")
STATE_VERSION = 1


@dataclass(frozen=True)
class _Config:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # per url, -1 when unknown (no manifest)
    image_size: int
    batch_size: int
    rank: int
    world_size: int
    readers_per_rank: int
    seed: int
    mode: str
    flip: bool
    shuffle_buffer: int
    output: str
    decoder: str
    skip_bad_shards: bool
    min_crop_frac: float
    max_crop_frac: float


def epoch_shards(cfg: _Config, epoch: int, worker: int) -> list[int]:
    """Shard indices read by (cfg.rank, worker) in `epoch`: seeded permutation, split by node then worker."""
    order = list(range(len(cfg.urls)))
    random.Random(f"shards/{cfg.seed}/{epoch}").shuffle(order)
    node_part = order[cfg.rank :: cfg.world_size]
    return node_part[worker :: cfg.readers_per_rank]


def _raw_epoch(cfg: _Config, epoch: int, worker: int, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    for index in epoch_shards(cfg, epoch, worker):
        url, expected = cfg.urls[index], cfg.counts[index]
        seen = 0
        try:
            for sample in iter_raw_samples(url):
                seen += 1
                yield sample
            if expected >= 0 and seen != expected:
                # A tar cut at a member boundary reads as a clean end; the manifest catches it.
                raise ShardReadError(f"shard {url} holds {seen} samples but its manifest says {expected}: it is truncated")
        except ShardReadError as err:
            if not cfg.skip_bad_shards:
                raise ShardReadError(f"{err}. Re-create it with `adm prepare-imagenet`, or skip it with skip_bad_shards=True (`adm train ... --set skip_bad_shards=true`)") from None
            stats["bad_shards"] += 1
            log.warning("skipping unreadable shard: %s", err)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[tuple[Any, bool]]:
    """Buffer shuffle that also flags the last item, so a reader knows when an epoch is complete."""
    size = max(1, size)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        out, buffer[j] = buffer[j], item
        yield out, False
    rng.shuffle(buffer)
    for i, item in enumerate(buffer):
        yield item, i == len(buffer) - 1


def _decode(cfg: _Config, sample: dict[str, Any], epoch: int) -> tuple[np.ndarray, int]:
    field = image_field(sample)
    if field is None:
        raise ValueError("no image field")
    if "cls" not in sample:
        raise ValueError("no .cls field")
    label = int(sample["cls"])
    draft = None
    if cfg.decoder == "pil-draft":
        draft = cfg.image_size if cfg.mode == "center" else math.ceil(cfg.image_size / cfg.min_crop_frac)
    img = decode_image(sample[field], draft_size=draft, decoder=cfg.decoder)
    rng = random.Random(f"aug/{cfg.seed}/{epoch}/{sample['__key__']}")
    if cfg.mode == "center":
        arr = center_crop_arr(img, cfg.image_size)
    else:
        arr = random_crop_arr(img, cfg.image_size, cfg.min_crop_frac, cfg.max_crop_frac, rng=rng)
    if cfg.flip:
        arr = maybe_flip(arr, rng)
    return arr, label


def reader_samples(cfg: _Config, worker: int, start: tuple[int, int], stats: dict[str, int]):
    """Infinite stream of (array, label, key, epoch, position_after) for one reader, from `start`.

    position_after is where this reader resumes if this is the last sample the caller received:
    (epoch, raw samples consumed in the epoch), or (epoch + 1, 0) after an epoch's last sample.
    """
    epoch, skip = start
    while True:
        rng = random.Random(f"buffer/{cfg.seed}/{epoch}/{cfg.rank}/{worker}")
        consumed = 0
        for sample, last in _shuffled(_raw_epoch(cfg, epoch, worker, stats), cfg.shuffle_buffer, rng):
            consumed += 1
            if consumed <= skip:
                continue  # already delivered before the resume: not decoded
            position = (epoch + 1, 0) if last else (epoch, consumed)
            try:
                arr, label = _decode(cfg, sample, epoch)
            except Exception as err:  # any undecodable sample: skip, count, log
                stats["corrupt"] += 1
                log.warning("skipping corrupt sample %s in %s: %s", sample["__key__"], sample["__url__"], err)
                continue
            yield arr, label, sample["__key__"], epoch, position
        if consumed == 0:
            shards = [cfg.urls[i] for i in epoch_shards(cfg, epoch, worker)]
            raise ShardReadError(f"rank {cfg.rank} reader {worker} got no samples in epoch {epoch} from {shards}")
        epoch, skip = epoch + 1, 0


def _collate(cfg: _Config, items: list[tuple]) -> dict[str, Any]:
    stacked = np.stack([it[0] for it in items])
    if cfg.output == "float":
        images = torch.from_numpy(to_float_chw(stacked))
    else:
        images = torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))
    return {
        "images": images,
        "labels": torch.tensor([it[1] for it in items], dtype=torch.int64),
        "keys": [it[2] for it in items],
        "epochs": torch.tensor([it[3] for it in items], dtype=torch.int64),
    }


class _BatchStream(IterableDataset):
    """What each DataLoader worker runs: its reader's batches, tagged with the reader's position."""

    def __init__(self, cfg: _Config, positions: list[tuple[int, int]], rotation: int):
        self.cfg, self.positions, self.rotation = cfg, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.cfg.readers_per_rank
        stats = {"corrupt": 0, "bad_shards": 0}
        items: list[tuple] = []
        for item in reader_samples(self.cfg, worker, self.positions[worker], stats):
            items.append(item)
            if len(items) == self.cfg.batch_size:
                batch = _collate(self.cfg, items)
                batch["_reader"] = worker
                batch["_position"] = items[-1][4]
                batch["_stats"] = dict(stats)
                items = []
                yield batch


def _worker_init(trainer_pid: int, _worker_id: int) -> None:
    """Set up a DataLoader worker: out of the job's signals, and never outliving its trainer.

    torchrun, a terminal's Ctrl-C and SLURM's preemption signals reach the whole process group; a
    worker that dies of SIGTERM makes the trainer fail with "DataLoader worker killed" before it can
    write its preemption checkpoint. A worker gets its own process group (so a group-wide SIGTERM
    passes it by, while the direct SIGTERM with which torch and multiprocessing stop workers still
    works) and ignores the checkpoint/requeue signals.

    Its own process group also means that killing the trainer's group (kill -9, a scheduler) does not
    reach it, and a worker blocked on a full result pipe never notices its parent's death: so the
    kernel is asked to SIGKILL it when the trainer exits (Linux PR_SET_PDEATHSIG), and it exits at
    once if the trainer is already gone.
    """
    import signal

    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(trainer_pid)


def _die_with_parent(trainer_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    # The trainer may have died between fork and prctl: then nobody will send the signal.
    if os.getppid() != trainer_pid:
        try:
            os.kill(trainer_pid, 0)
        except ProcessLookupError:
            os._exit(1)


class ShardLoader:
    """Infinite, shuffled, resumable batches of ImageNet from WebDataset shards.

    Args:
        shards: a folder made by `adm prepare-imagenet` (uses its manifest.json), a manifest path,
            a glob, a brace pattern, a URL (`pipe:...`, `s3://...` via fsspec, `https://...`) or a list.
        image_size: output side S.
        batch_size: samples per batch on this rank.
        rank, world_size: this process's data-parallel rank and the number of ranks (passed in,
            never read from global state). Every rank must pass the same `seed`.
        num_workers: DataLoader worker processes (0 = read in this process).
        seed: run seed: shard order per epoch, shuffle buffers and augmentation derive from it.
        mode: "center" (ADM diffusion training: `center_crop_arr`) or "random-crop" (classifier).
        flip: random horizontal flip with p=0.5.
        shuffle_buffer: samples held per reader for shuffling (memory ~ buffer x image bytes).
        output: "float" (float32 NCHW in [-1, 1], ADM's numbers) or "uint8" (NCHW, normalise on the
            GPU with `data.transforms.uint8_to_float`).
        decoder: "auto" (default: "simplejpeg" if installed and verified to give Pillow's pixels, else
            "pil"), "pil", "simplejpeg" (both bit-identical to ADM), or "pil-draft" (JPEG DCT-domain
            downscale: faster, not bit-identical; docs/data.md gives the measured difference).
        pin_memory: pin batches for fast host-to-GPU copies (default: when CUDA is available).
        skip_bad_shards: log and skip an unreadable shard instead of raising ShardReadError.
        min_crop_frac, max_crop_frac: random-crop range (ADM: 0.8, 1.0).
        prefetch_factor: batches prefetched per worker.

    Iterating yields dicts: `images` (tensor [B,3,S,S]), `labels` (int64 [B]), `keys` (list of str),
    `epochs` (int64 [B], the epoch each sample belongs to). `state_dict()` / `load_state_dict()` give
    exact resume with the same shards, world size, workers, batch size and seed.
    """

    def __init__(
        self,
        shards: Any,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        mode: str = "center",
        flip: bool = True,
        shuffle_buffer: int = 1000,
        output: str = "float",
        decoder: str = "auto",
        pin_memory: bool | None = None,
        skip_bad_shards: bool = False,
        min_crop_frac: float = 0.8,
        max_crop_frac: float = 1.0,
        prefetch_factor: int = 2,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if int(image_size) < 1 or int(batch_size) < 1:
            raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 < min_crop_frac <= max_crop_frac <= 1:
            raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}")
        if decoder == "simplejpeg" and not simplejpeg_matches_pillow():
            raise ValueError("decoder='simplejpeg' needs `pip install simplejpeg` giving Pillow's pixels; use decoder='pil'")
        if decoder == "auto":
            decoder = "simplejpeg" if simplejpeg_matches_pillow() else "pil"
        shard_set = resolve_shards(shards)
        readers = max(1, int(num_workers))
        if len(shard_set.urls) < int(world_size) * readers:
            raise ValueError(
                f"{len(shard_set.urls)} shards cannot feed world_size x num_workers = {world_size} x {readers} readers "
                "(each reader needs at least one shard): use fewer workers, or re-shard with a smaller --shard-size"
            )
        self._check_resize(shard_set.manifest, int(image_size), mode, min_crop_frac)
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self._cfg = _Config(
            urls=tuple(shard_set.urls),
            counts=tuple(shard_set.counts.get(u, -1) for u in shard_set.urls),
            image_size=int(image_size),
            batch_size=int(batch_size),
            rank=int(rank),
            world_size=int(world_size),
            readers_per_rank=readers,
            seed=int(seed),
            mode=mode,
            flip=bool(flip),
            shuffle_buffer=int(shuffle_buffer),
            output=output,
            decoder=decoder,
            skip_bad_shards=bool(skip_bad_shards),
            min_crop_frac=float(min_crop_frac),
            max_crop_frac=float(max_crop_frac),
        )
        self._positions: list[tuple[int, int]] = [(0, 0)] * readers
        self._batches = 0
        self._reader_stats: dict[int, dict[str, int]] = {}

    @staticmethod
    def _check_resize(manifest: dict | None, image_size: int, mode: str, min_crop_frac: float) -> None:
        options = (manifest or {}).get("options", {})
        crop = options.get("center_crop")
        if crop and (mode != "center" or image_size != crop):
            raise ValueError(
                f"these shards hold ADM centre crops of {crop} px: only mode='center' with image_size={crop} can use them "
                f"(asked: mode={mode!r}, image_size={image_size}); prepare shards without --center-crop for other uses"
            )
        resized = options.get("resize_short_side")
        if not resized:
            return
        if image_size > resized:
            raise ValueError(
                f"these shards were pre-resized to short side {resized} (< image_size {image_size}): "
                "use shards with original images, or prepare new ones with --resize-short-side >= image_size"
            )
        needed = math.ceil(image_size / min_crop_frac) if mode == "random-crop" else image_size
        if needed > resized:
            warnings.warn(
                f"random crops at {image_size} px need short side up to {needed}, but shards were pre-resized to "
                f"{resized}: crops are close to, not exactly, ADM's; prepare with --resize-short-side {needed} for exactness"
            )

    # -- what the shards hold -------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Class names (WNIDs) in label order, from the manifest (ImageNet's 1000 without one)."""
        return self.shard_set.classes

    @property
    def num_classes(self) -> int:
        """Number of labels (1000 for ImageNet, also when the shards hold only some classes)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order (ImageNet's names; else the class list itself)."""
        from data.classes import imagenet_names, imagenet_wnids

        classes = self.classes
        return imagenet_names() if classes == imagenet_wnids() else list(classes)

    @property
    def num_samples(self) -> int | None:
        """Samples per epoch (all ranks together), from the manifest; None without one."""
        counts = self._cfg.counts
        return sum(counts) if counts and min(counts) >= 0 else None

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's readers is still in."""
        return min(e for e, _ in self._positions)

    @property
    def stats(self) -> dict[str, int]:
        """Corrupt samples and bad shards skipped so far by this rank's readers (this process's iterators)."""
        total = {"corrupt": 0, "bad_shards": 0}
        for stats in self._reader_stats.values():
            for k in total:
                total[k] += stats.get(k, 0)
        return total

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on (infinite). Use one iterator at a time."""
        cfg = self._cfg
        stream = _BatchStream(cfg, list(self._positions), self._batches % cfg.readers_per_rank)
        if self.num_workers == 0:
            source: Any = stream
        else:
            source = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                worker_init_fn=functools.partial(_worker_init, os.getpid()),
                # Starting the workers draws their base seed from this generator; without one it
                # comes from the global torch RNG, which a resumed trainer has just restored, and
                # the run would be one draw off (dropout, rng state) from the uninterrupted one.
                generator=self._worker_seed_generator(),
            )
        for batch in source:
            reader = int(batch.pop("_reader"))
            position = batch.pop("_position")
            self._positions[reader] = (int(position[0]), int(position[1]))
            self._reader_stats[reader] = {k: int(v) for k, v in batch.pop("_stats").items()}
            self._batches += 1
            if self.num_workers == 0 and self.pin_memory:
                batch["images"] = batch["images"].pin_memory()
                batch["labels"] = batch["labels"].pin_memory()
            yield batch

    def _worker_seed_generator(self) -> torch.Generator:
        """The loader's own generator for DataLoader's worker seeds: a function of (seed, rank, position)."""
        cfg = self._cfg
        digest = hashlib.sha256(f"workers/{cfg.seed}/{cfg.rank}/{self._batches}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    # -- resume ---------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        names = "\n".join(u.rsplit("/", 1)[-1] for u in self._cfg.urls)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def _identity(self) -> dict[str, Any]:
        cfg = self._cfg
        return {
            "seed": cfg.seed,
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "num_workers": self.num_workers,
            "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer,
            "mode": cfg.mode,
            "shards": self._fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: JSON-serialisable; save one per rank with the checkpoint."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "batches": self._batches,
            "positions": [list(p) for p in self._positions],
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` left off. Raises ValueError if the set-up differs."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state has version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ValueError(
                "cannot resume the data position exactly, the set-up differs (" + "; ".join(diffs) + "). "
                "Resume with the same shards, seed, world size, workers and batch size, or start the loader afresh"
            )
        self._positions = [(int(e), int(k)) for e, k in state["positions"]]
        self._batches = int(state["batches"])
        self._reader_stats = {}

    def __repr__(self) -> str:
        cfg = self._cfg
        return (
            f"ShardLoader({len(cfg.urls)} shards, image_size={cfg.image_size}, batch_size={cfg.batch_size}, "
            f"rank={cfg.rank}/{cfg.world_size}, num_workers={self.num_workers}, mode={cfg.mode!r})"
        )
