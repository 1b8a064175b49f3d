"""The evaluation job: features of a reference batch and a sample file -> IS, FID, sFID, precision,
recall (+ class accuracy), printed as ADM's evaluator prints them and written to `metrics.json`.

Distributed (torchrun / srun; the caller sets up the process group with `runtime.distributed.setup()`): each rank reads its own
contiguous slice of each file; FID statistics and Inception-Score sums are float64 sums all-reduced
across ranks; only the pool features needed for precision/recall are gathered, to rank 0 alone.
The result does not depend on the number of ranks (up to float64 round-off).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from runtime.files import atomic_write_json
from runtime.npz import check_crc_runs
from evaluation import io as eio
from evaluation.features import FeatureNetwork, load_feature_network
from evaluation.metrics import FeatureStats, ScoreSums, frechet_distance, near_constant, precision_recall

METRICS_FORMAT = "adm-metrics/1"
METRIC_NAMES = ("inception_score", "fid", "sfid", "precision", "recall", "class_accuracy")


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and convolutions on GPUs (TF32 shifts FID in the 2nd decimal)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def process_group_position() -> tuple[int, int]:
    """(rank, world size) of the caller's process group; (0, 1) without one."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """This process's current GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if _distributed():
        for t in tensors:
            dist.all_reduce(t)


def _gather_rows(local: torch.Tensor, n_total: int, world: int, rank: int) -> torch.Tensor | None:
    """Concatenate every rank's rows (in rank order) on rank 0; other ranks get None."""
    if not _distributed():
        return local
    sizes = [_rank_slice(n_total, r, world) for r in range(world)]
    longest = max(b - a for a, b in sizes)
    padded = torch.zeros(longest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    bucket = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, bucket, dst=0)
    if rank != 0:
        return None
    return torch.cat([part[: b - a] for part, (a, b) in zip(bucket, sizes)])


class _Pass:
    """Running results of one file's slice: pool features kept, statistics and score sums accumulated."""

    def __init__(self, net: FeatureNetwork, num_items: int, stats: bool, labels: np.ndarray | None,
                 split_size: int):
        dev = net.device
        self.pool_dim = net.pool_dim
        self.pool_rows: list[torch.Tensor] = []
        self.pool_stats = FeatureStats(net.pool_dim, dev) if stats else None
        self.spatial_stats = FeatureStats(net.spatial_dim, dev) if stats and net.spatial_dim else None
        self.scores = ScoreSums(num_items, net.logit_dim, split_size, dev)
        self.labels = labels
        k = net.num_classes or 1
        self.correct = torch.zeros(k, dtype=torch.float64, device=dev)
        self.total = torch.zeros(k, dtype=torch.float64, device=dev)
        self.hit_rows: list[torch.Tensor] = []  # per-sample 0/1, for standard errors

    def add(self, feats, start: int) -> None:
        self.pool_rows.append(feats.pool.float())
        if self.pool_stats is not None:
            self.pool_stats.update(feats.pool)
        if self.spatial_stats is not None and feats.spatial is not None:
            self.spatial_stats.update(feats.spatial)
        self.scores.update(feats.logits, start)
        if self.labels is not None:
            y = torch.as_tensor(self.labels[start:start + feats.logits.shape[0]], device=self.correct.device)
            hit = (feats.logits.argmax(1) == y).double()
            self.correct.index_add_(0, y, hit)
            self.total.index_add_(0, y, torch.ones_like(hit))
            self.hit_rows.append(hit[:, None])

    def local_hits(self) -> torch.Tensor:
        """This rank's per-sample hits (1: the feature network agrees with the label) as [n, 1]."""
        if not self.hit_rows:
            return torch.zeros(0, 1, dtype=torch.float64, device=self.correct.device)
        return torch.cat(self.hit_rows)

    def local_pool(self) -> torch.Tensor:
        """This rank's pool features (possibly none when there are more ranks than images)."""
        if not self.pool_rows:
            return torch.zeros(0, self.pool_dim, device=self.correct.device)
        return torch.cat(self.pool_rows)

    def reduce(self) -> None:
        tensors = self.scores.tensors() + [self.correct, self.total]
        for s in (self.pool_stats, self.spatial_stats):
            if s is not None:
                tensors += s.tensors()
        _all_reduce(tensors)


def _check_integrity(path, crc_info: tuple, rank: int) -> None:
    """The zip CRC of the images member, from every rank's contiguous run (no second read), else one
    streaming pass on rank 0; ValueError on every rank when the file is corrupt."""
    run, size, expected = crc_info
    runs = [run]
    if _distributed():
        runs = [None] * dist.get_world_size()
        dist.all_gather_object(runs, run)
    if check_crc_runs(runs, size, expected, f"{path}:arr_0"):
        return
    problem = None
    if rank == 0:
        try:
            with eio.open_images(path) as images:
                images.verify()
        except ValueError as err:
            problem = str(err)
    if _distributed():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ValueError(problem)


def _extract(net: FeatureNetwork, path, key_labels: np.ndarray | None, stats: bool, batch_size: int,
             split_size: int, rank: int, world: int, progress: str | None) -> tuple[_Pass, int, tuple]:
    with eio.open_images(path) as images:
        n = len(images)
        acc = _Pass(net, n, stats, key_labels, split_size)
        start, stop = _rank_slice(n, rank, world)
        bar = _progress(stop - start, progress) if rank == 0 else None
        for first, batch in images.batches(batch_size, start, stop):
            acc.add(net(batch), first)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        shape = tuple(images.shape)
        crc_info = (images.crc_run(), images.member_size, images.member_crc)
    _check_integrity(path, crc_info, rank)
    acc.reduce()
    return acc, n, shape


def _progress(total: int, desc: str | None):
    if desc is None:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)


def _sample_options(sample_path: Path) -> dict | None:
    options = sample_path.parent / "options.json"
    if options.is_file():
        try:
            return json.loads(options.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            warnings.warn(f"{options} is not valid JSON; metrics.json will not carry the sample options")
    return None


def evaluate(reference, samples, features: str | FeatureNetwork = "inception", *, inception_weights=None,
             out_dir=None, batch_size: int = 100, k: int = 3, fp16_pr: bool = True, fid_method: str = "sqrtm",
             split_size: int = 5000, use_stored_stats: bool = True, device=None,
             print_fn: Callable[[str], None] | None = print, progress: bool = True,
             standard_errors: int = 0) -> dict | None:
    """Evaluate a sample file against a reference batch; returns the metrics record (every rank).

    `features`: "inception" (the paper's network; weights via `inception_weights`, env or hub cache),
    "classifier:PATH", or a FeatureNetwork. With `out_dir` (rank 0) writes `out_dir/metrics.json`.
    Reference statistics stored in the file (`mu, sigma, mu_s, sigma_s`) are used for Inception
    features unless `use_stored_stats=False`; otherwise they are computed from its images.
    `class_accuracy` is reported when the samples carry labels and the network predicts the dataset's
    classes. `standard_errors` S > 0 adds `standard_errors` (FID, precision, recall, class accuracy)
    and the per-half values `half_samples` from S random halves of the samples
    (evaluation.standard_errors: delete-half jackknife, reference held fixed). Distributed: the caller sets up the process group (`runtime.distributed.setup()`, as
    `adm evaluate` does) and calls this on every rank; each rank then reads its own rows.
    """
    t0 = time.perf_counter()
    rank, world = process_group_position()
    device = torch.device(device) if device is not None else default_device()
    reference, samples = Path(reference), Path(samples)
    for p in (reference, samples):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    with no_tf32():
        net = features if isinstance(features, FeatureNetwork) else load_feature_network(
            features, inception_weights=inception_weights, device=device)
        stored = eio.read_reference_stats(reference) if (use_stored_stats and net.name == "inception") else None
        with eio.open_images(samples) as probe:
            n_samples = len(probe)
        labels = eio.read_labels(samples, n_samples)
        class_note = None
        if labels is not None and net.num_classes is not None and (labels.min() < 0 or labels.max() >= net.num_classes):
            class_note = (f"labels span {labels.min()}..{labels.max()} but the feature network has "
                          f"{net.num_classes} classes: no class accuracy")
            labels = None
        if net.num_classes is None:
            labels = None
        ref, n_ref, ref_shape = _extract(net, reference, None, stored is None, batch_size, split_size,
                                         rank, world, "reference" if progress else None)
        sam, _, sam_shape = _extract(net, samples, labels, True, batch_size, split_size, rank, world,
                                     "samples" if progress else None)
        ref_pool = _gather_rows(ref.local_pool(), n_ref, world, rank)
        sam_pool = _gather_rows(sam.local_pool(), n_samples, world, rank)
        hits = None
        if standard_errors and sam.labels is not None:
            hits = _gather_rows(sam.local_hits(), n_samples, world, rank)
        record = None
        if rank == 0:
            record = _finish(net, ref, sam, stored, ref_pool, sam_pool, k, fp16_pr, fid_method, device)
            if standard_errors:
                from evaluation.standard_errors import half_sample_errors

                mu_r, sigma_r = (stored["mu"], stored["sigma"]) if stored is not None else ref.pool_stats.mean_cov()
                record.update(half_sample_errors(ref_pool, sam_pool, mu_r, sigma_r, hits, subsets=standard_errors,
                                                 k=k, fp16=fp16_pr, fid_method=fid_method, device=device))
            record.update({
                "format": METRICS_FORMAT, "reference": str(reference.resolve()), "samples": str(samples.resolve()),
                "num_reference": n_ref, "num_samples": n_samples, "image_size": int(sam_shape[1]),
                "reference_image_size": int(ref_shape[1]), "features": net.name,
                "options": _sample_options(samples),
                "settings": {"k": k, "pr_fp16": fp16_pr, "fid_method": fid_method, "split_size": split_size,
                             "reference_stats": "stored" if stored is not None else "computed",
                             "world_size": world, "batch_size": batch_size},
                "notes": [class_note] if class_note else [],
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 2),
            })
            if sam_shape[1:3] != ref_shape[1:3]:
                record["notes"].append(f"samples are {sam_shape[1]}x{sam_shape[2]} but the reference is "
                                       f"{ref_shape[1]}x{ref_shape[2]}")
            if out_dir is not None:
                atomic_write_json(Path(out_dir) / "metrics.json", record)
            if print_fn:
                print_fn(format_metrics(record["metrics"], record.get("standard_errors")))
                for warning in record["warnings"]:
                    print_fn(f"WARNING: {warning}")
    if _distributed():
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
    return record


def _finish(net, ref: _Pass, sam: _Pass, stored, ref_pool, sam_pool, k, fp16_pr, fid_method, device) -> dict:
    metrics: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    metrics["inception_score"] = sam.scores.score()
    mu_s, sigma_s = sam.pool_stats.mean_cov()
    if stored is not None:
        mu_r, sigma_r = stored["mu"], stored["sigma"]
    else:
        mu_r, sigma_r = ref.pool_stats.mean_cov()
    metrics["fid"] = frechet_distance(mu_s, sigma_s, mu_r, sigma_r, method=fid_method)
    if sam.spatial_stats is not None:
        if stored is not None and "mu_s" in stored:
            ref_spatial = stored["mu_s"], stored["sigma_s"]
        elif ref.spatial_stats is not None:
            ref_spatial = ref.spatial_stats.mean_cov()
        else:
            ref_spatial = None
        if ref_spatial is not None:
            metrics["sfid"] = frechet_distance(*sam.spatial_stats.mean_cov(), *ref_spatial, method=fid_method)
    radii: dict = {}
    metrics["precision"], metrics["recall"] = precision_recall(ref_pool, sam_pool, k=k, fp16=fp16_pr, device=device,
                                                               details=radii)
    record: dict = {"metrics": metrics}
    record["warnings"] = degeneracy_warnings((mu_r, sigma_r), (mu_s, sigma_s), radii, metrics["inception_score"])
    record["degenerate_features"] = any(w.startswith("degenerate features") for w in record["warnings"])
    if sam.labels is not None:
        total = float(sam.total.sum())
        metrics["class_accuracy"] = float(sam.correct.sum()) / total if total else None
        per_class = (sam.correct / sam.total.clamp_min(1)).tolist()
        record["class_accuracy_per_class"] = [a if t > 0 else None for a, t in zip(per_class, sam.total.tolist())]
    return record


def degeneracy_warnings(reference: tuple, samples: tuple, radii: dict, inception_score: float | None) -> list[str]:
    """Why the numbers may mean nothing: features that do not vary (a feature network that ignores its
    input, e.g. a barely trained domain classifier), k-NN balls of radius 0, class predictions that do
    not depend on the image. Messages naming the feature network start with "degenerate features"."""
    out = []
    if near_constant(*reference):
        out.append("degenerate features: the feature network gives (nearly) the same features for every reference "
                   "image, so FID is ~0 whatever the samples are; FID, sFID, precision and recall mean nothing here "
                   "(an untrained or broken feature network?)")
    elif near_constant(*samples):
        out.append("the samples' features are (nearly) constant: the samples are (nearly) identical images")
    share = radii.get("zero_radius_reference", 0.0)
    if share > 0.5:
        out.append(f"degenerate features: {share:.0%} of the reference points have a k-NN radius of 0 (the feature "
                   "network maps different images to the same point), so precision and recall mean nothing here")
    share = radii.get("zero_radius_samples", 0.0)
    if share > 0.5:
        out.append(f"{share:.0%} of the sample points have a k-NN radius of 0: duplicate samples, or a feature "
                   "network that maps different images to the same point")
    if inception_score is not None and inception_score < 1.0 + 1e-4:
        out.append(f"the class probabilities are the same for every sample (Inception Score {inception_score:.4g}): "
                   "identical samples, or a feature network that ignores its input")
    return out


def format_metrics(metrics: dict, errors: dict | None = None) -> str:
    """The lines ADM's evaluator prints (plus class accuracy when present, and standard errors when given)."""
    names = [("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
             ("precision", "Precision"), ("recall", "Recall"), ("class_accuracy", "Class accuracy")]
    lines = []
    for key, label in names:
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            se = (errors or {}).get(key)
            lines.append(f"{label}: {value}" + (f" (standard error {se:.4g})" if se is not None else ""))
    return "\n".join(lines)
