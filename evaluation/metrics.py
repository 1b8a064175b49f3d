"""FID / sFID, Inception Score, and precision / recall, numerically as ADM's evaluator computes them.

Every function accepts numpy arrays or torch tensors. Statistics are accumulated in float64
(`FeatureStats`, `ScoreSums`), so they can be summed across ranks and batches in any grouping.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch

FID_EPS = 1e-6           # diagonal offset of ADM's fallback for a singular covariance product
IMAG_TOLERANCE = 1e-3    # largest imaginary part on sqrtm's diagonal that is treated as round-off


def _as_float64(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values; the features or statistics that "
                         f"produced it are broken (check the sample file and the feature network)")
    return array


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mean of shape {mu.shape} and covariance of shape {sigma.shape} do "
                         f"not describe one Gaussian (need (D,) and (D, D))")


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): FID on pool features, sFID on spatial.

    `|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`.

    method="sqrtm" (default) is ADM's form: scipy's matrix square root of the product, imaginary
    round-off up to 1e-3 on its diagonal dropped (a larger one raises). ADM adds 1e-6 to both
    diagonals when that root is not finite; current scipy returns finite noise for a singular
    product instead, so the same fallback (with a RuntimeWarning) is applied when the root is not
    finite or either covariance is numerically rank-deficient (an eigenvalue <= D * eps * the
    largest: fewer samples than dimensions, or constant features).
    method="eigh" computes the same trace from the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric,
    hence faster and real); it agrees with "sqrtm" on well-conditioned covariances (see
    bench/eval.py) but applies no offset on singular ones.
    """
    mu1, mu2 = _as_float64("mu1", mu1), _as_float64("mu2", mu2)
    sigma1, sigma2 = _as_float64("sigma1", sigma1), _as_float64("sigma2", sigma2)
    _check_gaussian(mu1, sigma1, "first distribution")
    _check_gaussian(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two feature sets have different sizes ({mu1.shape[0]} vs "
                         f"{mu2.shape[0]} dims): reference and samples must use the same feature "
                         f"network and output (pool for FID, spatial for sFID)")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown method {method!r}; use 'sqrtm' (ADM's) or 'eigh'")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def is_rank_deficient(sigma: np.ndarray) -> bool:
    """Whether a covariance is numerically singular (numpy's matrix_rank tolerance, from eigenvalues)."""
    eig = np.linalg.eigvalsh(sigma)
    largest = eig.max()
    return bool(largest <= 0 or eig.min() <= largest * sigma.shape[0] * np.finfo(np.float64).eps)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy's own "singular" warning is replaced by the explicit rank check below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return np.asarray(scipy.linalg.sqrtm(matrix))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    singular = is_rank_deficient(sigma1) or is_rank_deficient(sigma2)
    covmean = None if singular else _sqrtm(sigma1 @ sigma2)
    if covmean is None or not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular (rank-deficient: fewer "
                      f"samples than feature dimensions, or constant features); adding {FID_EPS} to "
                      f"both diagonals as ADM's evaluator does. Use more samples for a meaningful "
                      f"number.", RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * FID_EPS
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > IMAG_TOLERANCE:
            raise ValueError(f"FID: the matrix square root has an imaginary component of {imag:.3g} "
                             f"on its diagonal (> {IMAG_TOLERANCE}); the covariances are not valid "
                             f"(not positive semi-definite) or far too ill-conditioned")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)) with A = sqrt(S1): S1 S2 is similar to A S2 A (PSD).
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


# ----------------------------------------------------------------------------- Inception Score


def _logits_float64(logits) -> torch.Tensor:
    t = torch.as_tensor(logits).detach().cpu().to(torch.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, classes) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("logits contain NaN or infinite values; the feature network's output is broken")
    return t


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score of (N, C) logits: consecutive splits of `split_size` in file order (the last may
    be shorter), per split `exp(mean_i KL(p_i || mean_j p_j))`, then the mean over splits.

    Softmax over all C classes (1008 for FID Inception), computed in float64.
    """
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    t = _logits_float64(logits)
    sums = ScoreSums(t.shape[0], t.shape[1], split_size)
    sums.update(t, start=0)
    return sums.score()


class ScoreSums:
    """Per-split sufficient statistics of the Inception Score, additive across batches and ranks.

    For split s: `sum_i p_i` (C), `sum_i sum_c p_ic log p_ic` and the count. Then
    `KL_s = plogp_s / n_s - sum_c pbar_c log pbar_c` with `pbar = sum p / n_s`. Each update says where
    its rows sit in the file (`start`), so ranks holding different slices agree with one process.
    """

    def __init__(self, num_items: int, num_classes: int, split_size: int = 5000, device="cpu"):
        self.split_size = split_size
        num_splits = max(1, math.ceil(num_items / split_size))
        self.p_sum = torch.zeros(num_splits, num_classes, dtype=torch.float64, device=device)
        self.plogp = torch.zeros(num_splits, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_splits, dtype=torch.float64, device=device)

    def update(self, logits, start: int) -> None:
        """Add logits of the rows `start, start+1, ...` of the file."""
        t = torch.as_tensor(logits).to(self.p_sum.device, torch.float64)
        if t.shape[0] == 0:
            return
        log_p = torch.log_softmax(t, dim=1)
        p = log_p.exp()
        split = (torch.arange(t.shape[0], device=t.device) + start) // self.split_size
        if int(split.max()) >= self.p_sum.shape[0]:
            raise ValueError(f"rows up to {start + t.shape[0]} exceed the {self.p_sum.shape[0]} "
                             f"splits this accumulator was sized for")
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce (sum) across ranks."""
        return [self.p_sum, self.plogp, self.count]

    def score(self) -> float:
        """The Inception Score over all splits that received rows."""
        used = self.count > 0
        pbar = self.p_sum[used] / self.count[used, None]
        kl = self.plogp[used] / self.count[used] - torch.special.xlogy(pbar, pbar).sum(1)
        return float(kl.exp().mean())


# ----------------------------------------------------------------------------- FID statistics


class FeatureStats:
    """Running float64 sums (sum x, sum x x^T, count) giving the mean and covariance (ddof=1).

    Exact under any split into batches or ranks (up to float64 round-off), so the statistics of 50k
    samples need neither all features in memory nor a gather.
    """

    def __init__(self, dim: int, device="cpu"):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, features) -> None:
        """Add a batch of (N, dim) features."""
        x = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or infinite values; the images or the feature "
                             "network are broken")
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce (sum) across ranks."""
        return [self.sum, self.outer, self.count]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as float64 numpy arrays; needs at least two rows."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {int(n)}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        cov = (cov + cov.T) / 2  # exact symmetry, as np.cov gives
        return mu.cpu().numpy(), cov.cpu().numpy()


def mean_cov(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1) of (N, D) features, in float64."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    stats = FeatureStats(x.shape[1])
    stats.update(x)
    return stats.mean_cov()


# ----------------------------------------------------------------------------- precision / recall


def _round_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Squared Euclidean distances `max(|u|^2 - 2 u.v + |v|^2, 0)`, (len(u), len(v)), as float32.

    With `fp16` this emulates ADM's float16 distance block: inputs rounded to half, the matmul
    accumulated in float32 and rounded to half (as cuBLAS does), every elementwise step rounded to
    half (float32 arithmetic on half values followed by rounding is exactly half arithmetic for
    +, -, *). A block that overflows half is recomputed in float32, as the original does.
    """
    if fp16:
        uh, vh = _round_fp16(u), _round_fp16(v)
        norm_u = _round_fp16(_round_fp16(uh * uh).sum(1))
        norm_v = _round_fp16(_round_fp16(vh * vh).sum(1))
        inner = _round_fp16(uh @ vh.T)
        d = _round_fp16(norm_u[:, None] - 2.0 * inner)
        d = _round_fp16(d + norm_v[None, :]).clamp_min_(0.0)
        if torch.isfinite(d).all() and torch.isfinite(inner).all():
            return d
    norm_u = (u * u).sum(1)
    norm_v = (v * v).sum(1)
    d = norm_u[:, None] - 2.0 * (u @ v.T)
    return (d + norm_v[None, :]).clamp_min_(0.0)


def _features_float32(name: str, value, device) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to(device=device, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or infinite values; the feature network's output is broken")
    return t


def manifold_radii(features: torch.Tensor, k: int = 3, fp16: bool = True,
                   block_size: int = 10000) -> torch.Tensor:
    """Per point, the squared distance to its k-th nearest other point of the same set.

    The point itself is the 0-th neighbour (distance 0, or round-off of it in fp16), as in ADM.
    Kept as a running top-(k+1) over column blocks, so memory is one block, not N x N.
    """
    n = features.shape[0]
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block_size):
        rows = features[r0:r0 + block_size]
        best = None
        for c0 in range(0, n, block_size):
            d = pairwise_sq_distances(rows, features[c0:c0 + block_size], fp16)
            small = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = small if best is None else torch.cat([best, small], 1)
            best = torch.topk(best, min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + block_size] = best[:, k]
    return radii


def near_constant(mu, sigma, tolerance: float = 1e-3) -> bool:
    """Whether features of mean `mu` and covariance `sigma` barely vary: their spread sqrt(tr sigma) is
    below `tolerance` times their size sqrt(|mu|^2 + tr sigma) (or exactly zero). FID between such
    features is ~0 whatever the images are: the feature network does not see them."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    spread = max(float(np.trace(sigma)), 0.0)
    size = float(mu @ mu) + spread
    return spread == 0.0 or spread <= tolerance ** 2 * size


def precision_recall(ref_features, sample_features, k: int = 3, fp16: bool = True,
                     block_size: int = 10000, device=None, details: dict | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them.

    Precision: share of samples within the k-NN ball of at least one reference point; recall: share
    of reference points within the ball of at least one sample (inclusive `<=`, squared distances).
    `fp16=True` (default) emulates ADM's float16 distance blocks (the numbers move at the 1e-3 level
    otherwise); `fp16=False` computes exactly in float32. Runs on CUDA when available unless
    `device` says otherwise; memory is a few blocks of block_size^2 floats. A `details` dict receives
    `zero_radius_reference` / `zero_radius_samples`: the share of points whose k-NN radius is 0 (their
    balls hold only duplicates: precision and recall then say nothing about the distributions).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    ref = _features_float32("reference features", ref_features, device)
    sam = _features_float32("sample features", sample_features, device)
    if ref.shape[1] != sam.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dims but sample features have "
                         f"{sam.shape[1]}: compute both with the same feature network")
    for name, t in (("reference", ref), ("sample", sam)):
        if t.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} points, got {t.shape[0]}")
    radii_ref = manifold_radii(ref, k, fp16, block_size)
    radii_sam = manifold_radii(sam, k, fp16, block_size)
    if details is not None:
        details["zero_radius_reference"] = float((radii_ref <= 0).double().mean())
        details["zero_radius_samples"] = float((radii_sam <= 0).double().mean())
    sample_in_ref = torch.zeros(sam.shape[0], dtype=torch.bool, device=device)
    ref_in_sample = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    # Rows are reference points and columns samples, the orientation of ADM's blocks (fp16 rounding
    # of |u|^2 - 2uv + |v|^2 is not symmetric in u and v).
    for r0 in range(0, ref.shape[0], block_size):
        rows = ref[r0:r0 + block_size]
        for c0 in range(0, sam.shape[0], block_size):
            d = pairwise_sq_distances(rows, sam[c0:c0 + block_size], fp16)
            sample_in_ref[c0:c0 + block_size] |= (d <= radii_ref[r0:r0 + block_size, None]).any(0)
            ref_in_sample[r0:r0 + block_size] |= (d <= radii_sam[None, c0:c0 + block_size]).any(1)
    return float(sample_in_ref.double().mean()), float(ref_in_sample.double().mean())
