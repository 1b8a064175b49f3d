"""Standard errors of the sample metrics: how much FID, precision, recall and class accuracy would move
with another draw of the same number of samples from the same sampler.

FID and precision / recall are not means of per-sample terms, so there is no closed form. We use the
delete-half jackknife (Shao & Wu 1989: the delete-d jackknife, consistent for non-smooth statistics
when d is a fixed fraction of n): the metric is recomputed on S random halves of the samples (drawn
without replacement) and

    SE^2 = (r / d) * mean_s (theta_s - mean theta)^2,      d = n - n // 2 deleted, r = n // 2 kept,

which for d = r is the plain variance over the halves. Unlike the bootstrap it never duplicates a
sample, which would shrink the k-NN radii that recall is built on. The reference batch is held
fixed: the errors are those of the samples alone, which is what a comparison of samplers against
one reference needs. Class accuracy, a mean of 0/1 hits, also gets the binomial sqrt(p (1 - p) / n),
the figure reported for it.

The halves depend only on (n, seed), so two sample files of the same size are cut into the same
halves: the per-half values stored in metrics.json give standard errors of *differences* between
two runs whose index i shares its seed and label (paired_standard_error), which are much smaller
than the two errors combined when the runs differ only in the sampler.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from evaluation.metrics import frechet_distance, mean_cov, precision_recall

METHOD = "delete-half jackknife over the samples (reference fixed); class accuracy: binomial"


def half_sample_indices(n: int, subsets: int, seed: int = 0) -> list[np.ndarray]:
    """`subsets` random halves (n // 2 indices each, sorted) of range(n); the same for the same (n, seed)."""
    if subsets < 2:
        raise ValueError(f"standard errors need at least 2 half-samples, got {subsets}")
    if n < 4:
        raise ValueError(f"standard errors need at least 4 samples, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(n),)))
    return [np.sort(rng.permutation(n)[: n // 2]) for _ in range(subsets)]


def jackknife_standard_error(values: Sequence[float], n: int) -> float:
    """The delete-half jackknife standard error from the metric's values on halves of n samples."""
    v = np.asarray(values, dtype=np.float64)
    kept = n // 2
    return float(math.sqrt(kept / (n - kept) * np.mean((v - v.mean()) ** 2)))


def paired_standard_error(a: Sequence[float], b: Sequence[float], n: int) -> float:
    """Standard error of (metric of run a) - (metric of run b) from their values on the same halves."""
    return jackknife_standard_error(np.asarray(a, np.float64) - np.asarray(b, np.float64), n)


def binomial_standard_error(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the standard error of a share p over n independent trials."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def half_sample_errors(ref_pool, sample_pool, ref_mu, ref_sigma, hits=None, *, subsets: int = 50, seed: int = 0,
                       k: int = 3, fp16: bool = True, fid_method: str = "sqrtm", device=None) -> dict:
    """Standard errors of FID, precision, recall (and class accuracy from per-sample `hits`, 0/1).

    `ref_pool` / `sample_pool`: the pool features [N, D]; `ref_mu`, `ref_sigma`: the reference
    statistics FID uses. Returns `{"method", "standard_errors": {metric: SE}, "half_samples":
    {"seed", "subsets", "size", metric: [value per half]}}`.
    """
    sample_pool = torch.as_tensor(sample_pool)
    n = sample_pool.shape[0]
    if n // 2 <= k:
        raise ValueError(f"standard errors with k={k} need more than {2 * (k + 1)} samples, got {n}")
    halves = half_sample_indices(n, subsets, seed)
    values: dict[str, list[float]] = {"fid": [], "precision": [], "recall": []}
    hits_np = None if hits is None else np.asarray(torch.as_tensor(hits).reshape(-1).cpu(), dtype=np.float64)
    if hits_np is not None:
        values["class_accuracy"] = []
    for idx in halves:
        part = sample_pool[torch.as_tensor(idx, device=sample_pool.device)]
        mu, sigma = mean_cov(part)
        values["fid"].append(frechet_distance(mu, sigma, ref_mu, ref_sigma, method=fid_method))
        p, r = precision_recall(ref_pool, part, k=k, fp16=fp16, device=device)
        values["precision"].append(p)
        values["recall"].append(r)
        if hits_np is not None:
            values["class_accuracy"].append(float(hits_np[idx].mean()))
    errors = {name: jackknife_standard_error(v, n) for name, v in values.items()}
    if hits_np is not None:
        errors["class_accuracy"] = binomial_standard_error(float(hits_np.mean()), n)
    return {"method": METHOD, "standard_errors": errors,
            "half_samples": {"seed": seed, "subsets": subsets, "size": n // 2, **values}}
