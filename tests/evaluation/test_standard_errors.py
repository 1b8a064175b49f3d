"""Standard errors of the sample metrics (evaluation.standard_errors): the delete-half jackknife against
the real spread of independent draws of real digits, the paired errors, and the evaluator's output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation import io as eio
from evaluation.evaluate import evaluate
from evaluation.metrics import frechet_distance, mean_cov, precision_recall
from evaluation.standard_errors import (binomial_standard_error, half_sample_errors, half_sample_indices,
                                        jackknife_standard_error, paired_standard_error)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_halves_depend_on_n_and_seed_only_and_the_mean_case():
    a, b = half_sample_indices(11, 5, seed=0), half_sample_indices(11, 5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and all(len(x) == 5 == len(set(x)) for x in a)
    assert not np.array_equal(half_sample_indices(11, 1 + 1, seed=1)[0], a[0])
    # For a mean the jackknife gives the textbook sigma / sqrt(n) (0/1 values: the binomial one).
    rng = np.random.default_rng(0)
    hits = (rng.random(400) < 0.3).astype(float)
    values = [hits[idx].mean() for idx in half_sample_indices(400, 400)]
    assert jackknife_standard_error(values, 400) == pytest.approx(binomial_standard_error(hits.mean(), 400), rel=0.1)
    assert paired_standard_error(values, values, 400) == 0.0
    with pytest.raises(ValueError, match="at least 2 half-samples"):
        half_sample_indices(10, 1)


def test_errors_match_the_spread_of_independent_draws(digits, small_classifier):
    """Samples unlike the reference, as a model's are: noisy digits (FID about 5 here). Over 20 random
    draws of 300 from 3,500 of them the metrics spread by some SD (corrected for the draws' overlap);
    the mean jackknife error of single draws is within a factor of two of it. (With samples from the
    reference's own distribution, FID about 0, the jackknife overstates FID's error: see docs.)"""
    model, _, _ = small_classifier
    images, labels = digits
    noise = np.random.default_rng(5).integers(-40, 41, images[1500:].shape)
    noisy = np.clip(images[1500:].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    with torch.no_grad():
        ref_pool = model.extract(images[:1000])[0].float()
        pool, _, logits = model.extract(noisy)
    pool, hits = pool.float(), (logits.argmax(1).numpy() == labels[1500:]).astype(float)
    mu_r, sigma_r = mean_cov(ref_pool)
    n, rng = 300, np.random.default_rng(1)
    spread = {"fid": [], "precision": [], "recall": [], "class_accuracy": []}
    estimates = {name: [] for name in spread}
    for draw in range(20):
        idx = rng.choice(len(pool), n, replace=False)
        spread["fid"].append(frechet_distance(*mean_cov(pool[idx]), mu_r, sigma_r))
        p, r = precision_recall(ref_pool, pool[idx], device="cpu")
        spread["precision"].append(p)
        spread["recall"].append(r)
        spread["class_accuracy"].append(hits[idx].mean())
        if draw < 3:
            errors = half_sample_errors(ref_pool, pool[idx], mu_r, sigma_r, hits[idx], subsets=20,
                                        device="cpu")["standard_errors"]
            for name in estimates:
                estimates[name].append(errors[name])
    overlap = np.sqrt(1 - n / len(pool))  # draws share samples: their spread is this much smaller
    assert 2 < np.mean(spread["fid"]) < 20
    for name in spread:
        ratio = np.mean(estimates[name]) / (np.std(spread[name], ddof=1) / overlap)
        assert 0.5 < ratio < 2.0, (name, ratio, spread[name], estimates[name])


def test_evaluate_writes_errors_and_half_sample_values(digits, small_classifier, tmp_path, capsys):
    from launch.cli import main as adm

    images, labels = digits
    np.savez(tmp_path / "ref.npz", images[2000:2300], labels[2000:2300])
    np.savez(tmp_path / "a.npz", images[2300:2500], labels[2300:2500])
    code = adm(["evaluate", str(tmp_path / "ref.npz"), str(tmp_path / "a.npz"), "--features",
                f"classifier:{small_classifier[1]}", "--out", str(tmp_path / "m"), "--standard-errors", "10"])
    assert code == 0 and "FID: " in capsys.readouterr().out
    record = json.loads((tmp_path / "m" / "metrics.json").read_text())
    errors, halves = record["standard_errors"], record["half_samples"]
    assert set(errors) == {"fid", "precision", "recall", "class_accuracy"} and all(v > 0 for v in errors.values())
    assert halves["subsets"] == 10 and halves["size"] == 100 and len(halves["fid"]) == 10
    acc = record["metrics"]["class_accuracy"]
    assert errors["class_accuracy"] == pytest.approx(binomial_standard_error(acc, 200))
    # Same n, same halves: the values of a run against itself differ by nothing.
    again = evaluate(tmp_path / "ref.npz", tmp_path / "a.npz", f"classifier:{small_classifier[1]}",
                     print_fn=None, progress=False, standard_errors=10)
    assert again["half_samples"]["fid"] == pytest.approx(halves["fid"])
    assert adm(["evaluate", str(tmp_path / "ref.npz"), str(tmp_path / "a.npz"), "--standard-errors", "1"]) == 2
    assert "between 2 and 10000" in capsys.readouterr().err
    with eio.open_images(tmp_path / "a.npz") as arr:
        assert len(arr) == 200
