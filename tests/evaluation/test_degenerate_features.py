"""A feature network whose features barely depend on the image gives FID ~0 and IS 1 that look like
results: the evaluator warns (stdout and metrics.json) and `adm report` marks the run.

The degenerate network is a real domain classifier file whose last batch norm scales its input by
1e-5 (what a collapsed, barely trained classifier looks like from outside); the healthy one is the
small classifier trained on the same digits, which must raise no warning.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.domain_classifier import load_domain_classifier, save_domain_classifier
from evaluation.evaluate import degeneracy_warnings
from evaluation.metrics import near_constant
from launch.cli import main as adm


@pytest.fixture(scope="module")
def files(digits, tmp_path_factory):
    images, labels = digits
    d = tmp_path_factory.mktemp("degenerate")
    np.savez(d / "ref.npz", images[3000:3200], labels[3000:3200])
    np.savez(d / "samples.npz", images[3200:3400], labels[3200:3400])
    return d


@pytest.fixture(scope="module")
def collapsed(small_classifier, files):
    model = load_domain_classifier(small_classifier[1])
    last_bn = model.stages[-1][-1][1]
    with torch.no_grad():
        last_bn.weight.mul_(1e-5)
        last_bn.bias.fill_(0.5)
    path = files / "collapsed.pt"
    save_domain_classifier(path, model)
    return path


def _evaluate(files, clf, out, capsys):
    code = adm(["evaluate", str(files / "ref.npz"), str(files / "samples.npz"), "--features", f"classifier:{clf}",
                "--out", str(out), "--batch-size", "100"])
    assert code == 0
    return capsys.readouterr().out, json.loads((out / "metrics.json").read_text())


def test_collapsed_features_are_flagged_and_reported(files, collapsed, small_classifier, tmp_path, capsys):
    printed, record = _evaluate(files, collapsed, tmp_path / "bad", capsys)
    assert record["metrics"]["fid"] < 1e-3  # the misleading number the warning is about
    assert record["degenerate_features"] is True
    assert any("same features for every reference image" in w for w in record["warnings"])
    assert "WARNING: degenerate features" in printed
    healthy_printed, healthy = _evaluate(files, small_classifier[1], tmp_path / "good", capsys)
    assert healthy["warnings"] == [] and not healthy["degenerate_features"] and "WARNING" not in healthy_printed

    assert adm(["report", str(tmp_path / "bad"), str(tmp_path / "good"), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    flags = {r["label"]: r["degenerate_features"] for r in report["runs"]}
    assert flags == {"bad": True, "good": False}
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| bad ⚠ degenerate features |" in markdown and "| good |" in markdown
    assert "## Warnings" in markdown and "bad: degenerate features" in markdown
    assert "degenerate features" in (tmp_path / "report" / "report.html").read_text()


def test_the_checks_themselves():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    assert not near_constant(x.mean(0), np.cov(x, rowvar=False))
    flat = 3.0 + 1e-6 * x
    assert near_constant(flat.mean(0), np.cov(flat, rowvar=False))
    assert near_constant(np.zeros(4), np.zeros((4, 4)))
    healthy = (x.mean(0), np.cov(x, rowvar=False))
    assert degeneracy_warnings(healthy, healthy, {"zero_radius_reference": 0.0, "zero_radius_samples": 0.0}, 5.0) == []
    found = degeneracy_warnings(healthy, healthy, {"zero_radius_reference": 0.9, "zero_radius_samples": 0.9}, 1.0)
    assert len(found) == 3 and found[0].startswith("degenerate features")
