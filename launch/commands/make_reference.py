"""Build a reference batch (.npz with Inception statistics) from shards, with ADM's preprocessing.

  adm make-reference SHARDS --size 64 --out ref64.npz [--num-images 10000] [--no-stats]
  torchrun --nproc_per_node 8 -m launch.cli make-reference SHARDS --size 256 --out ref256.npz

arr_0 holds --num-images centre-cropped images (a seed-determined subset), arr_1 their labels;
mu/sigma/mu_s/sigma_s are the statistics of every image in the shards (like ADM's VIRTUAL_* files).
"""
from __future__ import annotations

import argparse

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("shards", nargs="+", help="shard folder (with manifest.json), pattern or list")
    parser.add_argument("--size", type=int_at_least(1), required=True, help="image side S (ADM centre crop)")
    parser.add_argument("--out", required=True, help="reference .npz to write")
    parser.add_argument("--num-images", type=int_at_least(1), default=10000, help="images stored in arr_0")
    parser.add_argument("--no-stats", action="store_true",
                        help="store images only; statistics are then computed from them when evaluating")
    parser.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--batch-size", type=int_at_least(1), default=100)
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="decides which images go into arr_0")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else CPU)")


def run(args) -> int:
    from evaluation.reference import make_reference
    from runtime.distributed import cleanup, setup

    setup()
    shards = args.shards[0] if len(args.shards) == 1 else args.shards
    make_reference(shards, args.out, args.size, num_images=args.num_images, stats=not args.no_stats,
                   inception_weights=args.inception_weights, batch_size=args.batch_size, seed=args.seed,
                   device=args.device)
    cleanup()
    return 0
