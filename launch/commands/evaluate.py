"""FID, sFID, IS, precision and recall of a sample file against a reference batch.

  adm evaluate REF.npz SAMPLES.npz [--out DIR] [--features inception|classifier:PATH]
  torchrun --nproc_per_node 8 -m launch.cli evaluate REF.npz SAMPLES.npz     (split across GPUs)
  adm evaluate --train-classifier SHARDS_OR_NPZ --out clf.pt --image-size 32  (domain features)

Prints the five numbers as ADM's evaluator does and writes DIR/metrics.json (DIR defaults to the
sample file's folder). Inception weights: --inception-weights, $ADM_INCEPTION_WEIGHTS or the torch
hub cache (never downloaded).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.names import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("reference", nargs="?", help="reference batch .npz (arr_0 images, optional mu/sigma)")
    parser.add_argument("samples", nargs="?", help="sample file .npz (arr_0 uint8 NHWC, arr_1 labels)")
    parser.add_argument("--out", help="folder for metrics.json (default: the sample file's folder); "
                                      "with --train-classifier: the classifier file to write")
    parser.add_argument("--features", default="inception",
                        help="feature network: 'inception' (the paper's) or 'classifier:PATH' (domain classifier)")
    parser.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--batch-size", type=int_at_least(1), default=100, help="images per forward pass and rank")
    parser.add_argument("--pr-fp32", action="store_true",
                        help="exact float32 precision/recall distances instead of ADM's float16 emulation")
    parser.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                        help="matrix square root: ADM's scipy sqrtm form (default) or the faster eigen form")
    parser.add_argument("--no-stored-stats", action="store_true",
                        help="compute reference statistics from its images even if the file stores mu/sigma")
    parser.add_argument("--device", help="torch device (default: this rank's GPU, else CPU)")
    parser.add_argument("--standard-errors", type=int, default=0, metavar="S",
                        help="also estimate standard errors of FID, precision, recall and class accuracy from S "
                             "random halves of the samples (delete-half jackknife; e.g. 50; 0: none)")
    train = parser.add_argument_group("training a domain classifier (--features classifier:PATH)")
    train.add_argument("--train-classifier", metavar="DATA",
                       help="shards (folder, pattern) or an .npz with arr_0 images and arr_1 labels")
    train.add_argument("--image-size", type=int_at_least(1), help="image side for the classifier (default: the data's)")
    train.add_argument("--epochs", type=int_at_least(1), default=4)
    train.add_argument("--seed", type=int_at_least(0), default=0)


def run(args) -> int:
    if args.train_classifier:
        return _train(args)
    if not args.reference or not args.samples:
        raise ValueError("give REF.npz and SAMPLES.npz (or --train-classifier DATA --out FILE)")
    from evaluation.evaluate import evaluate
    from runtime.distributed import cleanup, setup

    if args.standard_errors and not 2 <= args.standard_errors <= 10000:
        raise ValueError(f"--standard-errors takes a number of half-samples between 2 and 10000 (e.g. 50), "
                         f"got {args.standard_errors}")
    setup()
    out = args.out or str(Path(args.samples).resolve().parent)
    record = evaluate(args.reference, args.samples, args.features, inception_weights=args.inception_weights,
                      out_dir=out, batch_size=args.batch_size, fp16_pr=not args.pr_fp32,
                      fid_method=args.fid_method, use_stored_stats=not args.no_stored_stats, device=args.device,
                      standard_errors=args.standard_errors)
    cleanup()
    if record is not None and record.get("notes"):
        for note in record["notes"]:
            print(f"note: {note}")
    return 0


def _train(args) -> int:
    from evaluation.domain_classifier import train_domain_classifier

    if not args.out:
        raise ValueError("--train-classifier needs --out FILE (where the classifier is saved)")
    data = args.train_classifier
    if data.endswith(".npz"):
        from evaluation import io as eio

        with eio.open_images(data) as images:
            arrays = images.read()
        labels = eio.read_labels(data, len(arrays))
        if labels is None:
            raise ValueError(f"{data} has no arr_1 labels; a classifier needs labelled images")
        data = (arrays, labels)
    _, info = train_domain_classifier(data, args.out, image_size=args.image_size, epochs=args.epochs,
                                      seed=args.seed)
    print(f"wrote {args.out} (validation accuracy {info['val_accuracy']})")
    return 0
