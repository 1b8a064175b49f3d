"""The evaluate job end to end (domain features on real digits), its CLI, and 2-process gloo runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import io as eio
from evaluation.evaluate import evaluate
from evaluation.features import Features, FeatureNetwork, classifier_network
from evaluation.metrics import frechet_distance, inception_score, mean_cov, precision_recall
from launch.cli import main as adm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(digits, tmp_path_factory):
    images, labels = digits
    d = tmp_path_factory.mktemp("eval")
    np.savez(d / "ref.npz", images[2000:2300], labels[2000:2300])
    run = d / "run"
    run.mkdir()
    np.savez(run / "samples.npz", images[2300:2700], labels[2300:2700])
    (run / "options.json").write_text(json.dumps({"classifier_scale": 1.0, "steps": 50, "model": "m.pt"}))
    noisy = images[2300:2700].astype(np.int64) + np.random.default_rng(0).integers(-90, 90, (400, 32, 32, 3))
    np.savez(d / "noisy.npz", np.clip(noisy, 0, 255).astype(np.uint8), labels[2300:2700])
    return d


def _direct(model, path):
    with eio.open_images(path) as arr:
        return Features(*model.extract(arr.read()))


def test_domain_features_equal_direct_computation(files, small_classifier, tmp_path):
    model, clf_path, _ = small_classifier
    rec = evaluate(files / "ref.npz", files / "run" / "samples.npz", f"classifier:{clf_path}", out_dir=tmp_path,
                   batch_size=64, print_fn=None, progress=False)
    m = rec["metrics"]
    ref, sam = _direct(model, files / "ref.npz"), _direct(model, files / "run" / "samples.npz")
    assert m["fid"] == pytest.approx(frechet_distance(*mean_cov(sam.pool), *mean_cov(ref.pool)), rel=1e-6)
    assert m["inception_score"] == pytest.approx(inception_score(sam.logits), rel=1e-6)
    assert (m["precision"], m["recall"]) == pytest.approx(precision_recall(ref.pool, sam.pool), abs=1e-12)
    labels = np.load(files / "run" / "samples.npz")["arr_1"]
    assert m["class_accuracy"] == pytest.approx(float((sam.logits.argmax(1).numpy() == labels).mean()))
    assert m["sfid"] is None  # the domain classifier has no spatial features
    assert len(rec["class_accuracy_per_class"]) == 10
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["metrics"] == pytest.approx(m) and on_disk["options"]["classifier_scale"] == 1.0
    assert on_disk["num_samples"] == 400 and on_disk["image_size"] == 32 and on_disk["settings"]["world_size"] == 1


def test_worse_samples_score_worse(files, small_classifier):
    net = classifier_network(small_classifier[1])
    good = evaluate(files / "ref.npz", files / "run" / "samples.npz", net, print_fn=None, progress=False)["metrics"]
    bad = evaluate(files / "ref.npz", files / "noisy.npz", net, print_fn=None, progress=False)["metrics"]
    assert bad["fid"] > 3 * good["fid"]
    assert bad["precision"] < good["precision"] and bad["class_accuracy"] < good["class_accuracy"]


def test_stored_reference_statistics_are_used(files, small_classifier, tmp_path):
    model = small_classifier[0]
    # A network reporting itself as "inception" makes evaluate trust statistics stored in the file.
    net = FeatureNetwork("inception", model, lambda x: tuple(model.extract(x)), model.feature_dim, None, None,
                         logit_dim=10)
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=model.feature_dim), np.eye(model.feature_dim) * 0.5
    with eio.open_images(files / "ref.npz") as arr:
        eio.write_reference_batch(tmp_path / "ref.npz", arr.read(), stats={"mu": mu, "sigma": sigma})
    samples = files / "run" / "samples.npz"
    rec = evaluate(tmp_path / "ref.npz", samples, net, print_fn=None, progress=False)
    sam = _direct(model, samples)
    assert rec["settings"]["reference_stats"] == "stored"
    assert rec["metrics"]["fid"] == pytest.approx(frechet_distance(*mean_cov(sam.pool), mu, sigma), rel=1e-6)
    assert rec["metrics"]["class_accuracy"] is None  # Inception-like networks have no dataset classes
    rec = evaluate(tmp_path / "ref.npz", samples, net, use_stored_stats=False, print_fn=None, progress=False)
    assert rec["settings"]["reference_stats"] == "computed"


def test_labels_outside_the_classifier_classes(files, small_classifier, tmp_path):
    with eio.open_images(files / "run" / "samples.npz") as arr:
        np.savez(tmp_path / "s.npz", arr.read(), np.full(400, 17))
    rec = evaluate(files / "ref.npz", tmp_path / "s.npz", classifier_network(small_classifier[1]), print_fn=None,
                   progress=False)
    assert rec["metrics"]["class_accuracy"] is None and "10 classes" in rec["notes"][0]


def test_cli_evaluate_prints_like_adm_and_writes_metrics(files, small_classifier, capsys):
    code = adm(["evaluate", str(files / "ref.npz"), str(files / "run" / "samples.npz"),
                "--features", f"classifier:{small_classifier[1]}", "--batch-size", "128"])
    assert code == 0
    out = capsys.readouterr().out
    for line in ("Inception Score: ", "FID: ", "Precision: ", "Recall: ", "Class accuracy: "):
        assert line in out
    assert "sFID" not in out
    assert (files / "run" / "metrics.json").is_file()  # default --out: the sample file's folder


def test_cli_refuses_bad_inputs(files, small_classifier, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "float.npz", np.zeros((4, 32, 32, 3), np.float32))
    assert adm(["evaluate", str(files / "ref.npz"), str(tmp_path / "float.npz"),
                "--features", f"classifier:{small_classifier[1]}"]) == 2
    assert "uint8" in capsys.readouterr().err
    monkeypatch.delenv("ADM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert adm(["evaluate", str(files / "ref.npz"), str(files / "run" / "samples.npz")]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "curl" in err
    assert adm(["evaluate", str(files / "ref.npz"), str(files / "run" / "samples.npz"), "--features", "vgg"]) == 2
    assert "classifier:PATH" in capsys.readouterr().err
    assert adm(["evaluate", str(files / "ref.npz")]) == 2


def test_cli_trains_a_domain_classifier_from_npz(files, tmp_path, capsys):
    out = tmp_path / "clf.pt"
    assert adm(["evaluate", "--train-classifier", str(files / "ref.npz"), "--out", str(out), "--epochs", "1"]) == 0
    from evaluation.domain_classifier import load_domain_classifier

    assert load_domain_classifier(out).config.num_classes == 10
    assert "validation accuracy" in capsys.readouterr().out


@pytest.mark.distributed
def test_two_gloo_processes_agree_with_one(files, small_classifier, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.cli", "evaluate", str(files / "ref.npz"), str(files / "run" / "samples.npz"),
           "--features", f"classifier:{small_classifier[1]}", "--out", str(tmp_path / "two"), "--batch-size", "64"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("FID: ") == 1  # only rank 0 prints
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = evaluate(files / "ref.npz", files / "run" / "samples.npz", f"classifier:{small_classifier[1]}",
                   batch_size=64, print_fn=None, progress=False)
    assert two["settings"]["world_size"] == 2
    for key, value in one["metrics"].items():
        if value is None:
            assert two["metrics"][key] is None, key
        else:
            assert two["metrics"][key] == pytest.approx(value, rel=1e-7, abs=1e-9), key


def test_no_tf32_turns_tf32_off_and_restores():
    from evaluation.evaluate import no_tf32

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
