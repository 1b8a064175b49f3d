"""Reports: tables beside the paper, guidance sweeps (plots + report.json), per-class grids, steps sweeps,
the CLI, and the page in a headless browser at 1300 px."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

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
    # one row per class, 8 samples each, 2 px gaps; small images enlarged x2 for reading; the class
    # names in a white margin at the left, one per row
    margin = grid.shape[1] - 2 * (8 * 34 + 2)
    assert grid.shape[0] == 2 * (10 * 34 + 2) and 40 < margin < 200
    row = grid.shape[0] / 10
    for r in range(10):
        band = grid[int(r * row):int((r + 1) * row), :margin - 4]
        assert (band < 100).any() and (band > 200).mean() > 0.6, f"no class name in row {r}"
    assert "one row per class" in html


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


# ---------------------------------------------------------------------------- steps sweeps
STEPS = [("ddpm", "250", 250), ("ddim", "ddim25", 25), ("ddim", "ddim15", 15), ("dpm++", "dpm++2m-10", 10),
         ("dpm++", "dpm++2m-15", 15), ("dpm++", "dpm++2m-20", 20)]


def _write_steps_run(root, sampler, steps, evals, scale, samples, seed, solver_start=None):
    """A metrics.json as adm evaluate --standard-errors writes it for a run of `adm sample`."""
    rng = np.random.default_rng(seed)
    fid, acc = 3.0 + 40.0 / evals, 0.5 + scale / 40 - 1.0 / evals
    options = {"classifier_scale": scale, "steps": steps, "sampler": sampler, "num_steps": evals,
               "network_evaluations": evals, "model": "/runs/unet", "classifier": "/runs/classifier",
               "seed": 0, "num_samples": 60, "out": f"/samples/{steps}-s{scale}-{solver_start}",
               "skip_type": None, "solver_start": solver_start,
               "content": {"dpm_solver": {"order": 2}} if sampler == "dpm++" else {}}
    halves = {"seed": 0, "subsets": 5, "size": 30, "fid": list(fid + rng.normal(0, 0.3, 5)),
              "precision": list(0.7 + rng.normal(0, 0.02, 5)), "recall": list(0.6 + rng.normal(0, 0.02, 5)),
              "class_accuracy": list(acc + rng.normal(0, 0.03, 5))}
    record = {"format": "adm-metrics/1", "features": "classifier:/a/long/folder/name/domain_classifier.pt",
              "image_size": 32, "num_samples": 60, "reference": "/r.npz", "samples": str(samples),
              "metrics": {"inception_score": 4.0, "fid": fid, "sfid": None, "precision": 0.7, "recall": 0.6,
                          "class_accuracy": acc},
              "standard_errors": {"fid": 0.3, "precision": 0.02, "recall": 0.02, "class_accuracy": 0.05},
              "half_samples": halves, "options": options}
    folder = root / (f"{steps}-s{scale}" + (f"-start{solver_start:g}" if solver_start is not None else ""))
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))


@pytest.fixture
def steps_sweep(tmp_path, digits):
    images, labels = digits
    samples = tmp_path / "samples.npz"
    np.savez(samples, images[:60], labels[:60])
    for k, (sampler, steps, evals) in enumerate(STEPS):
        for scale in (4.0, 16.0):
            _write_steps_run(tmp_path / "steps", sampler, steps, evals, scale, samples, seed=k)
    return tmp_path / "steps"


def test_steps_sweep_section(steps_sweep, tmp_path):
    """Runs that differ in sampler and steps (at two scales): one steps sweep, no two-point guidance
    sweeps, a table with standard errors and paired differences to the sampler with most evaluations."""
    summary = build_report([steps_sweep], tmp_path / "r", title="steps")
    assert summary["guidance_sweeps"] == [] and len(summary["steps_sweeps"]) == 1
    sweep = summary["steps_sweeps"][0]
    assert sweep["reference"] == "DDPM-250" and len(sweep["points"]) == 12
    point = next(p for p in sweep["points"] if p["sampler"] == "DPM-Solver++(2M)-15" and p["scale"] == "4")
    assert point["evaluations"] == 15 and point["fid_se"] == 0.3
    diff, se = point["diffs"]["DDIM-15"]["fid"]
    record = json.loads((steps_sweep / "dpm++2m-15-s4.0" / "metrics.json").read_text())
    other = json.loads((steps_sweep / "ddim15-s4.0" / "metrics.json").read_text())
    assert diff == pytest.approx(record["metrics"]["fid"] - other["metrics"]["fid"])
    d = np.subtract(record["half_samples"]["fid"], other["half_samples"]["fid"])
    assert se == pytest.approx(np.sqrt(30 / 30 * np.mean((d - d.mean()) ** 2)))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Quality against network evaluations" in md and "steps_0.png" in md
    assert "DPM-Solver++(2M)-20" in md and "5.67 ± 0.30" in md and "0.833 ± 0.050" in md
    assert Image.open(tmp_path / "r" / "steps_0.png").size[0] > 600


def test_a_solver_start_is_a_sampler_of_the_same_sweep(steps_sweep, tmp_path, digits):
    """`--solver-start T` runs (same samples, labels, seed) are compared, paired, with DDIM and DDPM in
    one sweep, not split into a sweep of their own (the demo's DPM-Solver++@960 rows had no baseline)."""
    for scale in (4.0, 16.0):
        _write_steps_run(steps_sweep, "dpm++", "dpm++2m-15", 15, scale, tmp_path / "samples.npz", seed=9,
                         solver_start=960.0)
    summary = build_report([steps_sweep], tmp_path / "r", title="steps")
    assert len(summary["steps_sweeps"]) == 1 and len(summary["steps_sweeps"][0]["points"]) == 14
    point = next(p for p in summary["steps_sweeps"][0]["points"] if p["sampler"] == "DPM-Solver++(2M)@960-15")
    assert {"DDIM-25", "DDPM-250", "DPM-Solver++(2M)-15"} <= set(point["diffs"])


# ---------------------------------------------------------------------------- in a browser
PROBE = """<script>
window.addEventListener('load', () => {
  const w = window.innerWidth;
  const over = [...document.querySelectorAll('img, .wide, figure, h1, h2, p')]
    .filter(e => e.getBoundingClientRect().right > w + 0.5)
    .map(e => e.tagName + ' ' + (e.getAttribute('src') || e.className || ''));
  const images = [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.getBoundingClientRect().width]);
  document.body.setAttribute('data-probe', JSON.stringify({w, scroll: document.documentElement.scrollWidth, over, images}));
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs chromium for a headless browser (apt-get install -y chromium; .ci/run installs it)")
def test_report_page_fits_a_1300_px_window(sweep, steps_sweep, tmp_path):
    """The guidance-sweep plot (five panels), the steps table and plot and the class grids, in
    headless Chromium at 1300 x 900: nothing reaches past the window's right edge, the page does not
    scroll sideways, and every image loaded. Also leaves a screenshot, report.png."""
    out = tmp_path / "r"
    build_report([sweep, steps_sweep], out, title="a report at 1300 px")
    page = out / "report.html"
    probe = out / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE))
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1300,900", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"data-probe=\"([^\"]*)\"", dom.stdout)
    assert match, dom.stderr[-2000:]
    result = json.loads(html.unescape(match.group(1)))
    assert result["w"] == 1300 and result["scroll"] <= 1300, result
    assert result["over"] == [], result
    assert result["images"] and all(natural > 0 and 0 < shown <= 1300 for _, natural, shown in result["images"])
    shot = subprocess.run(base + [f"--screenshot={out / 'report.png'}", page.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert Image.open(out / "report.png").size[0] == 1300, shot.stderr[-2000:]
