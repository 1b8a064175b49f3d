"""`adm demo`: the dataset adapter and the driver's bookkeeping (fast), and the quick demo end to end
with the guidance acceptance of issue 8 (slow: a few minutes on two CPU cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import digits as demo_dataset
from launch import demo

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# dataset adapter
# ---------------------------------------------------------------------------------------------
def test_to_rgb32_pads_without_resampling():
    digit = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    out = demo_dataset.to_rgb32(digit)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[2:30, 2:30, 0] == digit).all()
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[:2].sum() == out[30:].sum() == out[:, :2].sum() == out[:, 30:].sum() == 0
    with pytest.raises(ValueError, match="at least 28"):
        demo_dataset.to_rgb32(digit, 16)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    summary = demo_dataset.write_digit_folders(root, per_class=3)
    return root, summary


def test_digit_folder_layout(digit_folder):
    root, summary = digit_folder
    assert summary["num_images"] == 30 and summary["classes"] == [str(d) for d in range(10)]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    images, labels = demo_dataset.load_mnist_digits()
    for d in range(10):
        files = sorted((root / str(d)).iterdir())
        assert len(files) == 3
        index = int(files[0].stem.split("_")[1])
        assert labels[index] == d
        img = Image.open(files[0])
        assert img.mode == "RGB" and img.size == (32, 32)
        assert (np.asarray(img) == demo_dataset.to_rgb32(images[index])).all()
    assert not list(root.parent.glob(".tmp-*"))


def test_digit_folder_is_reused_and_refuses_other_options(digit_folder):
    root, summary = digit_folder
    stamp = (root / "0").stat().st_mtime_ns
    assert demo_dataset.write_digit_folders(root, per_class=3) == summary
    assert (root / "0").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other options"):
        demo_dataset.write_digit_folders(root, per_class=4)


def test_digit_folder_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("not digits")
    with pytest.raises(ValueError, match="not a complete digit folder"):
        demo_dataset.write_digit_folders(tmp_path / "x", per_class=1)


def test_prepare_reads_the_digit_folder(digit_folder, tmp_path):
    from data.prepare import prepare_imagenet

    root, _ = digit_folder
    manifest = prepare_imagenet(root, tmp_path / "shards", allow_custom_classes=True, workers=1)
    assert manifest["num_samples"] == 30
    assert manifest["class_list"] == [str(d) for d in range(10)]  # label k is digit k
    assert manifest["skipped"] == []


# ---------------------------------------------------------------------------------------------
# driver bookkeeping
# ---------------------------------------------------------------------------------------------
def test_settings_overrides():
    s = demo.DemoSettings.quick().replace(["num_samples=40", "scales=[0, 3]", "unet_set=[lr=1e-4, batch_size=8]"])
    assert s.num_samples == 40 and s.scales == (0.0, 3.0) and s.unet_set == ("lr=1e-4", "batch_size=8")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        s.replace(["no_such_key=1"])
    with pytest.raises(ValueError, match="list of KEY=VALUE"):
        s.replace(["unet_set=16"])


def test_quick_is_smaller_than_full():
    q, f = demo.DemoSettings.quick(), demo.DemoSettings.full()
    assert q.scales == f.scales == (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    assert q.unet_steps <= f.unet_steps and q.classifier_steps <= f.classifier_steps
    assert q.num_samples <= f.num_samples


def test_refuses_a_folder_of_other_settings(tmp_path):
    demo.check_settings(tmp_path, demo.DemoSettings.quick())
    demo.check_settings(tmp_path, demo.DemoSettings.quick())
    with pytest.raises(ValueError, match="num_samples"):
        demo.check_settings(tmp_path, demo.DemoSettings.full().replace(["num_samples=7"]))


def test_the_demo_is_a_pipeline_of_real_commands(tmp_path):
    s = demo.DemoSettings.quick()
    pipeline = demo.demo_pipeline(tmp_path, s)  # every stage's options pass its command's own parser
    ids = [stage.id for stage in pipeline.stages]
    assert ids[:6] == ["dataset", "shards", "unet", "classifier", "domain", "reference"]
    assert len(ids) == 6 + 2 * len(s.scales) + 1 and ids[-1] == "report"
    assert pipeline.stage("sample-s4").command_line.startswith("adm sample --model ")
    assert "--classifier-scale 4 " in pipeline.stage("sample-s4").command_line
    assert set(pipeline.stage("eval-s4").after) == {"sample-s4", "domain", "reference"}


def test_the_steps_sweep_stages(tmp_path):
    """--steps-sweep: a sample and an evaluate stage (with standard errors) per sampler entry and scale,
    one report over them; the same seed and labels for every sampler; the base stages unchanged."""
    s = demo.DemoSettings.full()
    base = demo.demo_pipeline(tmp_path, s)
    pipeline = demo.demo_pipeline(tmp_path, s, steps_sweep=True)
    ids = [stage.id for stage in pipeline.stages]
    points = len(s.sweep_samplers) * len(s.sweep_scales)
    assert len(ids) == len(base.stages) + 2 * points + 1 and ids[-1] == "report-steps"
    for stage in base.stages:
        assert pipeline.stage(stage.id).command_line == stage.command_line
    line = pipeline.stage("sweep-sample-dpm2m15-solverstart960-s16").command_line
    assert "--steps dpm++2m-15 --solver-start 960 " in line and "--classifier-scale 16 " in line
    assert "--labels balanced" in line and "--seed 0 " in line
    assert "--solver-start" not in pipeline.stage("sweep-sample-dpm2m20-s4").command_line
    assert "--steps 250 " in pipeline.stage("sweep-sample-ddpm250-s4").command_line
    assert "--standard-errors 50 " in pipeline.stage("sweep-eval-ddim25-s4").command_line
    assert len(pipeline.stage("report-steps").after) == points
    other = demo.demo_pipeline(tmp_path, s.replace(["sweep_samplers=['--steps dpm++1-10 --thresholding']"]),
                               steps_sweep=True)
    assert "--thresholding" in other.stage("sweep-sample-dpm110-thresholding-s4").command_line
    with pytest.raises(ValueError, match="no --steps"):
        demo.demo_pipeline(tmp_path, s.replace(["sweep_samplers=['--solver-start 960']"]), steps_sweep=True)


def test_a_folder_of_an_earlier_version_is_accepted(tmp_path):
    """demo.json written before the sweep settings existed: accepted at their defaults, then completed."""
    old = demo.DemoSettings.full().to_dict()
    for key in ("sweep_samplers", "sweep_scales", "sweep_samples", "sweep_standard_errors"):
        del old[key]
    (tmp_path / "demo.json").write_text(json.dumps(old))
    demo.check_settings(tmp_path, demo.DemoSettings.full())
    assert json.loads((tmp_path / "demo.json").read_text()) == demo.DemoSettings.full().to_dict()
    (tmp_path / "demo.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="sweep_samples"):
        demo.check_settings(tmp_path, demo.DemoSettings.full().replace(["sweep_samples=100"]))


def test_steps_summary_answers_the_issue_questions():
    def point(sampler, evals, acc, fid, diffs):
        return {"sampler": sampler, "evaluations": evals, "scale": "4", "class_accuracy": acc, "class_accuracy_se": 0.02,
                "fid": fid, "fid_se": 0.5, "precision": 0.7, "precision_se": 0.02, "recall": 0.8, "recall_se": 0.02,
                "diffs": diffs}
    report = {"steps_sweeps": [{"points": [
        point("DDPM-250", 250, 0.80, 5.0, {}), point("DDIM-25", 25, 0.75, 6.0, {}),
        point("DPM-Solver++(2M)@960-15", 15, 0.76, 6.2, {"DDIM-25": {"class_accuracy": [0.01, 0.008], "fid": [0.2, 0.3]}}),
        point("DPM-Solver++(2M)@960-20", 20, 0.77, 6.0, {"DDPM-250": {"class_accuracy": [-0.03, 0.01], "fid": [1.0, 0.4]}}),
        point("DDIM-15", 15, 0.7, 7.0, {}),
    ]}]}
    rows = demo.steps_comparisons(report)
    assert [(r["fast"], r["metric"], r["verdict"]) for r in rows] == [
        ("DPM-Solver++(2M)@960-15", "class_accuracy", "within"), ("DPM-Solver++(2M)@960-15", "fid", "within"),
        ("DPM-Solver++(2M)@960-20", "class_accuracy", "worse"), ("DPM-Solver++(2M)@960-20", "fid", "worse")]
    text = demo.steps_summary(report)
    assert "0.760±0.020" in text
    assert "DPM-Solver++(2M)@960-20 - DDPM-250: FID +1.00 (paired SE 0.40; DDPM-250's SE 0.50: worse)" in text
    assert "DPM-Solver++(2M)@960-15 - DDIM-25: class acc +0.010 (paired SE 0.008; DDIM-25's SE 0.020: within it)" in text


def test_summary_table():
    report = {"guidance_sweep": [{"scale": 0.0, "class_accuracy": 0.1, "fid": 30.0, "precision": 0.2, "recall": 0.6},
                                 {"scale": 8.0, "class_accuracy": 0.9, "fid": 10.0, "precision": 0.7, "recall": 0.2}]}
    text = demo.summary_table(report)
    assert "class acc" in text and "0.900" in text and len(text.splitlines()) == 3


# ---------------------------------------------------------------------------------------------
# the quick demo, end to end (what CI runs)
# ---------------------------------------------------------------------------------------------
def test_check_guidance():
    good = [{"scale": x, "class_accuracy": a, "fid": f, "precision": 0.7 + 0.01 * i, "recall": 0.9 - 0.01 * i}
            for i, (x, a, f) in enumerate(((0, 0.1, 17.0), (1, 0.3, 18.0), (2, 0.5, 14.0), (4, 0.7, 10.0),
                                           (8, 0.8, 8.0)))]
    assert demo.check_guidance(good) == []
    flat = [dict(r, class_accuracy=0.1) for r in good]
    assert any("far above" in f for f in demo.check_guidance(flat))
    dip = [dict(r) for r in good]
    dip[2]["class_accuracy"] = 0.2
    assert any("rise" in f for f in demo.check_guidance(dip))
    lucky = [dict(r) for r in good]
    lucky[0]["class_accuracy"] = 0.3
    assert any("chance" in f for f in demo.check_guidance(lucky))
    worse = [dict(r) for r in good]
    worse[-1]["fid"] = 20.0
    assert any("FID" in f for f in demo.check_guidance(worse))
    assert demo.check_guidance(good[1:])  # no scale 0


def test_check_guidance_precision_recall():
    # The full run's measured sweep (docs/demo.md): recall peaks at scale 4 and ends below scale 0.
    pr = ((0.702, 0.909), (0.684, 0.839), (0.704, 0.920), (0.686, 0.941), (0.694, 0.918), (0.736, 0.906),
          (0.724, 0.877))
    good = [{"scale": x, "class_accuracy": a, "fid": f, "precision": p, "recall": r}
            for x, a, f, (p, r) in zip((0, 1, 2, 4, 8, 16, 32), (0.11, 0.34, 0.49, 0.63, 0.74, 0.81, 0.85),
                                       (17.7, 20.7, 16.7, 12.5, 8.8, 7.0, 5.6), pr)]
    assert demo.check_guidance(good) == []
    flat = [dict(r, precision=0.702) for r in good]
    assert any("precision does not rise" in f for f in demo.check_guidance(flat))
    # Below its peak but above scale 0: the unguided model's dropped digits came back, no trade-off.
    rising = [dict(r, recall=0.7 + 0.02 * i) for i, r in enumerate(good)]
    rising[-2]["recall"] = 0.9
    assert any("recall does not fall" in f for f in demo.check_guidance(rising))
    # The quick run is not held to the trade-off.
    assert demo.check_guidance(flat, precision_recall=False) == []
    assert demo.check_guidance(rising, precision_recall=False) == []


def quick_demo_dir(tmp_path_factory) -> Path:
    """One folder per test session for the quick demo: tests/test_readme.py's `make demo` uses it
    too, so whichever runs second finds every stage done."""
    return tmp_path_factory.getbasetemp() / "demo-quick"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path_factory):
    out = quick_demo_dir(tmp_path_factory)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "launch.cli", "demo", "--quick", "--out", str(out)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"adm demo --quick took {seconds:.0f} s\n{run.stdout[-1500:]}")
    assert "report:" in run.stdout and "class acc" in run.stdout and "guidance works" in run.stdout

    report = json.loads((out / "report" / "report.json").read_text())
    assert demo.check_guidance(report["guidance_sweep"], precision_recall=False) == [], report["guidance_sweep"]
    for name in ("report.html", "report.md"):
        assert (out / "report" / name).stat().st_size > 0
    assert len(list((out / "report").glob("grid_*.png"))) == 7
    assert list((out / "report").glob("sweep_*.png"))

    # A rerun skips every finished stage and gives the same report.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == 21 and "done in" not in again.stdout, again.stdout
    assert json.loads((out / "report" / "report.json").read_text())["guidance_sweep"] == report["guidance_sweep"]
