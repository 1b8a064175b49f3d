"""FID, IS and precision/recall against independent numpy implementations and closed forms."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from evaluation.metrics import (FeatureStats, ScoreSums, frechet_distance, inception_score, mean_cov,
                                pairwise_sq_distances, precision_recall)


def _fid_oracle(mu1, s1, mu2, s2):
    """Fréchet distance via the symmetric form tr sqrt(sqrt(S1) S2 sqrt(S1)), from eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.maximum(ev, 0)).sum())


def _random_gaussian(rng, d, n):
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    return a.mean(0), np.cov(a, rowvar=False)


def test_fid_matches_independent_numpy_and_eigh():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_gaussian(rng, 40, 400)
    mu2, s2 = _random_gaussian(rng, 40, 300)
    expected = _fid_oracle(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-10)
    # torch tensors are accepted too
    assert frechet_distance(*(torch.as_tensor(a) for a in (mu1, s1, mu2, s2))) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)


def test_fid_rank_deficient_falls_back_with_warning():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(10, 32))  # 10 samples in 32 dims: rank 9
    mu1, s1 = few.mean(0), np.cov(few, rowvar=False)
    mu2, s2 = _random_gaussian(rng, 32, 500)
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        value = frechet_distance(mu1, s1, mu2, s2)
    eye = np.eye(32) * 1e-6
    # The original's fallback: the same formula with 1e-6 added to both diagonals.
    assert value == pytest.approx(_fid_oracle(mu1, s1 + eye, mu2, s2 + eye) - 2 * 32e-6, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(mu2, s2, mu2 + 1, s2)  # full rank: no warning


def test_fid_bad_inputs():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="covariance"):
        frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="imaginary"), pytest.warns(RuntimeWarning):
        frechet_distance(mu, -np.eye(4), mu, np.eye(4))  # not a covariance: sqrt of -I is imaginary
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="svd")


def test_feature_stats_match_numpy_and_merge():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(257, 12)).astype(np.float32) * 3 + 1
    stats = FeatureStats(12)
    for i in range(0, 257, 50):
        stats.update(x[i:i + 50])
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    # Summing two accumulators (what all_reduce does) gives the same statistics.
    a, b = FeatureStats(12), FeatureStats(12)
    a.update(x[:100]); b.update(x[100:])
    for ta, tb in zip(a.tensors(), b.tensors()):
        ta += tb
    np.testing.assert_allclose(a.mean_cov()[1], cov, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 12), np.nan))
    with pytest.raises(ValueError, match="shape"):
        stats.update(np.zeros((2, 11)))
    with pytest.raises(ValueError, match="at least 2"):
        mean_cov(np.zeros((1, 3)))


def _is_oracle(logits, split):
    """ADM's formula: softmax, then per split exp(mean KL(p || mean p)); mean over splits."""
    x = logits - logits.max(1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_matches_numpy_with_partial_last_split():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 9)) * 2
    assert inception_score(logits, split_size=7) == pytest.approx(_is_oracle(logits, 7), rel=1e-12)
    assert inception_score(torch.as_tensor(logits, dtype=torch.float32), split_size=30) == pytest.approx(
        _is_oracle(logits, 30), rel=1e-6)


def test_inception_score_closed_forms():
    assert inception_score(np.zeros((20, 5))) == pytest.approx(1.0)
    confident = np.eye(4)[np.arange(40) % 4] * 60.0  # certain predictions, classes balanced
    assert inception_score(confident) == pytest.approx(4.0, rel=1e-9)
    # Order matters across splits: sorting by class makes each split single-class, IS -> 1.
    assert inception_score(confident[np.argsort(np.arange(40) % 4, kind="stable")], split_size=10) == pytest.approx(1.0)


def test_score_sums_any_chunking_and_bad_input():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(50, 6))
    sums = ScoreSums(50, 6, split_size=8)
    for start in (40, 0, 17, 31):  # out of order, uneven chunks
        stop = {40: 50, 0: 17, 17: 31, 31: 40}[start]
        sums.update(logits[start:stop], start=start)
    assert sums.score() == pytest.approx(_is_oracle(logits, 8), rel=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        inception_score(np.zeros(5))


def _pr_oracle(ref, sam, k, fp16):
    """Brute force with numpy; fp16 follows the TF graph op by op in numpy float16."""
    def dist(u, v):
        if not fp16:
            u64, v64 = u.astype(np.float64), v.astype(np.float64)
            return np.maximum((u64 ** 2).sum(1)[:, None] - 2 * u64 @ v64.T + (v64 ** 2).sum(1)[None], 0)
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
        nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
        mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = (nu[:, None] - np.float16(2) * mm) + nv[None, :]
        return np.maximum(d, np.float16(0)).astype(np.float32)

    r_ref = np.sort(dist(ref, ref), 1)[:, k]
    r_sam = np.sort(dist(sam, sam), 1)[:, k]
    d = dist(ref, sam)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_sam[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("fp16", [False, True])
def test_precision_recall_matches_numpy(fp16):
    rng = np.random.default_rng(6)
    ref = np.abs(rng.normal(size=(120, 24))).astype(np.float32)
    sam = (np.abs(rng.normal(size=(150, 24))) * 1.2 + 0.1).astype(np.float32)
    expected = _pr_oracle(ref, sam, 3, fp16)
    assert precision_recall(ref, sam, fp16=fp16) == pytest.approx(expected, abs=1e-12)
    # Block size is an implementation detail.
    assert precision_recall(ref, sam, fp16=fp16, block_size=37) == pytest.approx(expected, abs=1e-12)


def test_fp16_distances_round_like_half_arithmetic():
    rng = np.random.default_rng(7)
    u = torch.as_tensor(np.abs(rng.normal(size=(20, 64))) * 2, dtype=torch.float32)
    v = torch.as_tensor(np.abs(rng.normal(size=(30, 64))) * 2, dtype=torch.float32)
    d16 = pairwise_sq_distances(u, v, fp16=True)
    assert torch.equal(d16, d16.half().float())  # every value is a half
    exact = pairwise_sq_distances(u, v, fp16=False)
    assert not torch.equal(d16, exact) and torch.allclose(d16, exact, rtol=2e-3, atol=0.5)


def test_fp16_overflow_falls_back_to_fp32():
    rng = np.random.default_rng(8)
    ref = (np.abs(rng.normal(size=(40, 8))) * 400).astype(np.float32)  # squared norms > 65504
    sam = (np.abs(rng.normal(size=(50, 8))) * 400).astype(np.float32)
    assert precision_recall(ref, sam, fp16=True) == precision_recall(ref, sam, fp16=False)


def test_precision_recall_closed_forms_and_bad_input():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(60, 5)).astype(np.float32)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 1000.0, fp16=False) == (0.0, 0.0)
    with pytest.raises(ValueError, match="dims"):
        precision_recall(a, a[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(a, np.full_like(a, np.nan))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(a[:3], a)
