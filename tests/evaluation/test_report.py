"""Reports: tables beside the paper, guidance sweeps (plots + report.json), per-class grids, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evaluation.report import build_report, class_grid
from launch.cli import main as adm


def _write_run(folder, scale, metrics, samples=None, features="classifier:c.pt", image_size=32):
    folder.mkdir(parents=True)
    record = {"format": "adm-metrics/1", "metrics": metrics, "features": features, "image_size": image_size,
              "num_samples": 100, "reference": "/r.npz", "samples": str(samples) if samples else None,
              "options": {"classifier_scale": scale, "steps": 50, "model": "demo.pt"}}
    (folder / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path, digits):
    images, labels = digits
    samples = tmp_path / "samples.npz"
    np.savez(samples, images[:60], labels[:60])
    for scale, fid in [(2.0, 5.0), (0.0, 9.0), (1.0, 6.0)]:
        _write_run(tmp_path / "sweep" / f"scale_{scale}", scale,
                   {"inception_score": 3.0 + scale, "fid": fid, "sfid": None, "precision": 0.5 + scale / 10,
                    "recall": 0.6 - scale / 10, "class_accuracy": 0.7 + scale / 10}, samples)
    return tmp_path / "sweep"


def test_sweep_report(sweep, tmp_path):
    out = tmp_path / "report"
    summary = build_report([sweep], out, title="Digits")
    assert [p["scale"] for p in summary["guidance_sweep"]] == [0.0, 1.0, 2.0]
    assert summary["guidance_sweep"][0] == {"scale": 0.0, "class_accuracy": 0.7, "fid": 9.0, "precision": 0.5,
                                            "recall": 0.6}
    assert json.loads((out / "report.json").read_text()) == summary
    md = (out / "report.md").read_text()
    assert "Guidance sweep" in md and "sweep_0.png" in md and "grid_0.png" in md
    assert "domain features" in md  # no paper comparison for domain features
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "Digits" in html
    plot = Image.open(out / "sweep_0.png")
    assert plot.size[0] > 400
    grid = np.asarray(Image.open(out / "grid_0.png"))
    # one row per class, 8 samples each, 2 px gaps; small images enlarged x2 for reading
    assert grid.shape == (2 * (10 * 34 + 2), 2 * (8 * 34 + 2), 3)


def test_class_grid_rows_hold_one_class(tmp_path, digits):
    images, labels = digits
    np.savez(tmp_path / "s.npz", images[:200], labels[:200])
    grid = class_grid(tmp_path / "s.npz", max_classes=3, per_class=4)
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)
    first_of_class_1 = images[:200][labels[:200] == 1][0]
    np.testing.assert_array_equal(grid[36:68, 2:34], first_of_class_1)
    np.savez(tmp_path / "u.npz", images[:10])
    assert class_grid(tmp_path / "u.npz", max_classes=4, per_class=4).shape[0] == 3 * 34 + 2  # unlabelled: 10 in rows of 4
    assert class_grid(tmp_path / "missing.npz") is None


def test_paper_numbers_beside_inception_runs_and_side_by_side(tmp_path):
    a = {"metrics": {"inception_score": 200.0, "fid": 4.1, "sfid": 6.0, "precision": 0.82, "recall": 0.52},
         "features": "inception", "image_size": 256, "label": "ours-256", "options": {"classifier_scale": 1.0}}
    b = dict(a, label="ours-256-b", options={"classifier_scale": 1.0, "steps": 25})
    summary = build_report([a, b], tmp_path / "r")
    assert {p["fid"] for p in summary["paper"]} == {4.59, 3.94, 3.9426}
    assert summary["guidance_sweep"] == []  # same scale: a comparison, not a sweep
    md = (tmp_path / "r" / "report.md").read_text()
    assert "3.943" in md and "215.8" in md and "ours-256-b" in md


def test_report_errors_and_cli(sweep, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adm evaluate"):
        build_report([tmp_path / "empty"], tmp_path / "r")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="metrics"):
        build_report([tmp_path / "bad.json"], tmp_path / "r")
    assert adm(["report", str(sweep), "--out", str(tmp_path / "cli")]) == 0
    assert "1 guidance sweeps" in capsys.readouterr().out
    assert (tmp_path / "cli" / "report.html").is_file()
