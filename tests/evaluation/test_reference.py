"""make-reference: shards -> reference batch with ADM's centre crop and statistics of every image."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from evaluation import io as eio
from evaluation.features import inception_network
from evaluation.metrics import mean_cov
from evaluation.reference import _priority, make_reference
from launch.cli import main as adm


@pytest.fixture
def shard_dir(digits, tmp_path):
    import webdataset as wds

    images, labels = digits
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as sink:
            for i in range(s * 3, s * 3 + 3):
                buf = io.BytesIO()
                Image.fromarray(images[i][2:30, 1:31]).save(buf, format="PNG")  # 28x30: cropped and resized
                sink.write({"__key__": f"img{i:04d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()})
    return folder


def _expected_images(digits, size):
    from data.transforms import center_crop_arr

    images, labels = digits
    return {f"img{i:04d}": (center_crop_arr(Image.fromarray(images[i][2:30, 1:31]), size), labels[i]) for i in range(6)}


def test_make_reference_with_statistics(shard_dir, digits, tmp_path, _inception_master):
    net = inception_network(_inception_master)
    out = tmp_path / "ref.npz"
    summary = make_reference(str(shard_dir), out, 32, num_images=4, network=net, batch_size=4, log=None)
    assert summary["num_images"] == 4 and summary["num_seen"] == 6
    expected = _expected_images(digits, 32)
    chosen = sorted(expected, key=lambda k: _priority(0, k))[:4]  # the seed decides which images are kept
    ref = np.load(out)
    np.testing.assert_array_equal(ref["arr_0"], np.stack([expected[k][0] for k in chosen]))
    np.testing.assert_array_equal(ref["arr_1"], [expected[k][1] for k in chosen])
    feats = net(np.stack([v[0] for v in expected.values()]))  # statistics cover all 6 images
    mu, sigma = mean_cov(feats.pool)
    stats = eio.read_reference_stats(out)
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-4, atol=1e-5)
    assert stats["mu_s"].shape == (2023,) and stats["sigma_s"].shape == (2023, 2023)


def test_cli_make_reference_images_only(shard_dir, digits, tmp_path, capsys):
    out = tmp_path / "ref16.npz"
    assert adm(["make-reference", str(shard_dir), "--size", "16", "--out", str(out), "--no-stats",
                "--num-images", "100"]) == 0
    ref = np.load(out)
    assert ref["arr_0"].shape == (6, 16, 16, 3) and "mu" not in ref.files
    assert eio.read_reference_stats(out) is None
    assert adm(["make-reference", str(tmp_path / "nothing"), "--size", "16", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert adm(["make-reference", str(shard_dir), "--size", "16", "--out", str(out), "--num-images", "0"]) == 2


@pytest.mark.distributed
def test_two_gloo_processes_write_the_same_file(shard_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["make-reference", str(shard_dir), "--size", "16", "--no-stats", "--num-images", "4"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launch.cli", *args, "--out", str(tmp_path / "two.npz")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert adm([*args, "--out", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
