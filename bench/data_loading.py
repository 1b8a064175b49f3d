"""Decode + ADM crop throughput per CPU core: shards vs separate files, decoders, pre-resized shards.

    .venv/bin/python bench/data_loading.py [--images 200] [--repeat 3] [--sizes 64 256]

Builds an ImageNet-like set of real photos (scikit-learn's two sample photos, randomly cropped and
scaled to ImageNet's typical 500x375-ish sizes, JPEG quality 90), writes it as class folders and as
shards (original bytes, and pre-resized with --resize-short-side), then times, in one process:
- "files/PIL": ADM's way: open each file, PIL decode, convert RGB, center_crop_arr, to float.
- "shards/<decoder>": ShardLoader (num_workers=0, so all work is on this core) with each decoder.
- "resized-<fmt>": ShardLoader on shards made with --resize-short-side S (ADM's halvings stored).
- "cropped-<fmt>": ShardLoader on shards made with --center-crop S (ADM's crop stored).
Throughput is images per CPU-second of this process (time.process_time), so other load on the
machine does not distort it; every pipeline runs `--repeat` times (interleaved with the baseline,
so a slow phase of the machine hits both) and the table gives the best and the median rate; ratios
are median against median at the same size. It also prints how far the inexact "pil-draft" decoder
is from ADM's pixels, and the CPU cores per GPU each storage format needs to feed ADM-64 and ADM-256
training at the MFU goal (40 % of an H100/H200's dense bf16 peak).
"""
from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.classes import imagenet_wnids  # noqa: E402
from runtime.files import atomic_write_bytes  # noqa: E402
from data.loader import ShardLoader  # noqa: E402
from data.prepare import prepare_imagenet  # noqa: E402
from data.transforms import center_crop_arr, decode_image, simplejpeg_matches_pillow  # noqa: E402


def make_photos(root: Path, count: int, seed: int = 0) -> list[Path]:
    """ImageNet-like JPEGs from real photos in 10 WNID class folders; returns the file paths."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 2 x (427, 640)
    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()[:10]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        cw, ch = int(rng.integers(300, 640)), int(rng.integers(250, 427))
        x, y = int(rng.integers(0, 640 - cw + 1)), int(rng.integers(0, 427 - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.ROTATE_90)  # portrait images too
        long_side = int(rng.choice([500, 500, 500, 400, 640, 800]))
        scale = long_side / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        path = root / wnids[i % 10] / f"{wnids[i % 10]}_{i:05d}.JPEG"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def per_file_pil(paths: list[Path], size: int) -> None:
    """ADM's ImageDataset + default_collate: one open per file, PIL decode, RGB, centre crop, flip,
    float [-1, 1] CHW, batches of 25 stacked into a tensor."""
    rng = random.Random(0)
    batch = []
    for path in paths:
        with open(path, "rb") as handle:
            img = Image.open(handle)
            img.load()
        arr = center_crop_arr(img.convert("RGB"), size)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        batch.append(torch.as_tensor(np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1])))
        if len(batch) == 25:
            torch.stack(batch)
            batch = []


def from_shards(shards: Path, size: int, count: int, decoder: str) -> None:
    loader = ShardLoader(shards, size, batch_size=25, seed=0, decoder=decoder, shuffle_buffer=100, flip=True, pin_memory=False)
    for _ in itertools.islice(iter(loader), math.ceil(count / 25)):
        pass


def cpu_rates(fn, count: int, repeat: int) -> list[float]:
    """Images per CPU-second of each of `repeat` runs."""
    rates = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        rates.append(count / (time.process_time() - start))
    return rates


def cores_per_gpu(sizes: list[int], mfu: float = 0.4) -> dict[int, tuple[str, float]]:
    """{size: (preset, training images/s one GPU consumes at `mfu`)} for ADM-64 and ADM-256 in bf16."""
    from diffusion_core import presets
    from launch.train.perf import datasheet_peak, flops_per_image

    peak, _ = datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")  # H100 SXM and H200: same 989 TFLOP/s
    out = {}
    for size, name in ((64, "adm64"), (256, "adm256")):
        if size in sizes:
            out[size] = (name, mfu * peak / flops_per_image(presets.get(name)))
    return out


def draft_difference(paths: list[Path], size: int) -> tuple[float, int, float]:
    """Mean |diff| and max |diff| in 0..255 levels, and the share of identical values: pil-draft vs exact."""
    diffs = []
    for path in paths:
        data = path.read_bytes()
        exact = center_crop_arr(decode_image(data), size).astype(np.int16)
        draft = center_crop_arr(decode_image(data, draft_size=size), size).astype(np.int16)
        diffs.append(np.abs(exact - draft))
    d = np.stack(diffs)
    return float(d.mean()), int(d.max()), float((d == 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    n = (args.images // 25) * 25 or 25
    with tempfile.TemporaryDirectory(prefix="adm-bench-data-") as tmp:
        tmp = Path(tmp)
        paths = make_photos(tmp / "src", n)
        mean_bytes = sum(p.stat().st_size for p in paths) / n
        prepare_imagenet(tmp / "src", tmp / "shards", shard_size=8 << 20, workers=1)
        print(f"{n} ImageNet-like JPEGs, mean {mean_bytes / 1024:.0f} KiB, from real photos; pid {os.getpid()}")
        print(f"simplejpeg available and identical to Pillow: {simplejpeg_matches_pillow()}")
        decoders = ["pil"] + (["simplejpeg"] if simplejpeg_matches_pillow() else []) + ["pil-draft"]
        rows = []
        for size in args.sizes:
            pipelines = [("files/PIL (ADM)", "exact", lambda: per_file_pil(paths, size))]
            for decoder in decoders:
                pipelines.append((f"shards/{decoder}", "approx" if decoder == "pil-draft" else "exact",
                                  lambda d=decoder: from_shards(tmp / "shards", size, n, d)))
            variants = [("resize_short_side", f) for f in ("png", "npy", "jpg")] + [("center_crop", f) for f in ("png", "npy")]
            for option, fmt in variants:
                out = tmp / f"{option}-{size}-{fmt}"
                prepare_imagenet(tmp / "src", out, shard_size=8 << 20, resize_format=fmt, **{option: size})
                shard_bytes = sum(p.stat().st_size for p in out.glob("*.tar")) / n
                name = "resized" if option == "resize_short_side" else "cropped"
                pipelines.append((f"{name}-{fmt} ({shard_bytes / 1024:.0f} KiB/img)", "approx" if fmt == "jpg" else "exact",
                                  lambda o=out: from_shards(o, size, n, "auto")))
            rates = {label: [] for label, _, _ in pipelines}
            for _ in range(args.repeat):  # interleaved: every pipeline sees the same phases of the machine
                for label, _, fn in pipelines:
                    rates[label] += cpu_rates(fn, n, 1)
            base = statistics.median(rates[pipelines[0][0]])
            for label, exact, _ in pipelines:
                med = statistics.median(rates[label])
                rows.append((size, label, exact, max(rates[label]), med, med / base))
        need = cores_per_gpu(args.sizes)
        print(f"\n{'size':>4}  {'pipeline':<32} {'pixels':<7} {'best/core':>9} {'median':>7} {'vs files':>8} "
              f"{'cores per GPU':>13}")
        for size, name, exact, best, med, ratio in rows:
            cores = f"{need[size][1] / med:13.2f}" if size in need else ""
            print(f"{size:>4}  {name:<32} {exact:<7} {best:>9.0f} {med:>7.0f} {ratio:>7.2f}x {cores}")
        for size, (preset, rate) in need.items():
            print(f"{preset}: one H100/H200 at 40 % MFU (bf16) trains {rate:.0f} images/s")
        for size in args.sizes:
            mean, worst, same = draft_difference(paths[: min(n, 100)], size)
            print(f"pil-draft vs exact at {size}px: mean |diff| {mean:.2f} levels, max {worst}, identical values {same:.1%}")


if __name__ == "__main__":
    main()
