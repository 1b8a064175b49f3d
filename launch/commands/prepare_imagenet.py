"""Convert ImageNet to WebDataset shards: the ILSVRC2012 train tar (a tar of per-class tars, read in
place), a folder of WNID class folders, or validation images with their label file. Resumable: rerun
the same command after a crash to complete only what is missing."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from runtime.names import int_at_least


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 268435456, 256M, 1G)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `adm prepare-imagenet`."""
    parser.add_argument("src", help="ILSVRC2012_img_train.tar, a folder of class folders, or validation images")
    parser.add_argument("out", help="output folder for <split>-NNNNNN.tar shards and manifest.json")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="names the shards (default: train)")
    parser.add_argument("--val-labels", help="label file for flat validation images (LOC_val_solution.csv, or 'NAME WNID' lines)")
    parser.add_argument("--shard-size", type=_size, default=256 << 20, help="target bytes per shard (default 256M)")
    parser.add_argument("--samples-per-shard", type=int_at_least(1), help="fixed number of samples per shard instead of --shard-size")
    parser.add_argument("--workers", type=int_at_least(1), default=min(8, os.cpu_count() or 1), help="parallel shard writers")
    parser.add_argument(
        "--resize-short-side",
        type=int_at_least(1),
        help="store images after ADM's BOX halvings down to short side in [S, 2S): exact for image sizes <= S",
    )
    parser.add_argument(
        "--center-crop",
        type=int_at_least(1),
        help="store ADM's centre crop at this size: exact and fastest, but only for centre crops at exactly this size",
    )
    parser.add_argument(
        "--resize-format",
        choices=("png", "npy", "jpg"),
        default="png",
        help="png (default) or npy (raw pixels, fastest to load): exact; jpg: smaller, lossy",
    )
    parser.add_argument("--allow-custom-classes", action="store_true", help="build the class list from the source (non-ImageNet data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the conversion and print a summary."""
    from data.prepare import prepare_imagenet

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = prepare_imagenet(
        args.src,
        args.out,
        split=args.split,
        val_labels=args.val_labels,
        shard_size=args.shard_size,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        resize_short_side=args.resize_short_side,
        center_crop=args.center_crop,
        resize_format=args.resize_format,
        allow_custom_classes=args.allow_custom_classes,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    present = len(manifest["classes"])
    print(f"{args.out}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, {present} of {manifest['num_classes']} classes")
    if manifest["missing_classes"] and present:
        print(f"missing classes: {len(manifest['missing_classes'])} (listed in manifest.json)")
    if manifest["converted_to_rgb_when_loaded"]:
        print(f"{manifest['converted_to_rgb_when_loaded']} greyscale/CMYK/alpha images kept as they are; converted to RGB when loaded, as ADM does")
    for item in manifest["skipped"][:20]:
        print(f"skipped {item['path']}: {item['reason']}")
    if len(manifest["skipped"]) > 20:
        print(f"... {len(manifest['skipped']) - 20} more skipped (see manifest.json)")
    return 0
