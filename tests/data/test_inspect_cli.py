"""`adm inspect-shards` and `adm prepare-imagenet` through the CLI dispatcher."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
from PIL import Image

from launch.cli import main

from .conftest import GOOD_SAMPLES


def test_inspect_clean_folder_with_grid(mini_shards, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["inspect-shards", str(mini_shards), "--grid", str(grid), "--grid-count", "9", "--grid-size", "16"]) == 0
    out = capsys.readouterr().out
    assert f"samples: {GOOD_SAMPLES}" in out and "classes present: 4 of 1000" in out and "missing classes (996)" in out
    img = np.asarray(Image.open(grid))
    assert img.shape == (48, 48, 3) and img.std() > 10  # 3x3 tiles of real digits


def test_inspect_reports_duplicates_bad_samples_and_bad_shards(mini_shards, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(mini_shards, bad)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("n01440764_1000.jpg", b"\xff\xd8\xff\xe0 broken"), ("n01440764_1000.cls", b"0")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (bad / "extra-000000.tar").write_bytes(buf.getvalue())  # duplicate key + undecodable image
    (bad / "train-000005.tar").write_bytes((bad / "train-000005.tar").read_bytes()[:1500])
    code = main(["inspect-shards", str(bad / "*.tar"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["duplicate_keys"] == ["n01440764_1000"]
    assert [b["key"] for b in report["bad_samples"]] == ["n01440764_1000"]
    assert len(report["bad_shards"]) == 1 and "train-000005.tar" in report["bad_shards"][0]["reason"]
    assert any(m["shard"].endswith("train-000005.tar") for m in report["manifest_count_mismatch"])


def test_inspect_catches_a_silently_changed_shard(mini_shards, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(mini_shards, changed)
    shard = changed / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        label = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    # A wrong label that still parses: only the checksum can tell.
    data[label.offset_data] = ord("7") if data[label.offset_data] != ord("7") else ord("8")
    shard.write_bytes(bytes(data))
    assert main(["inspect-shards", str(changed)]) == 1
    out = capsys.readouterr().out
    assert "sha256 differs" in out and "bad samples" not in out


def test_prepare_cli_summary_and_errors(mini_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare-imagenet", str(mini_src), str(out), "--shard-size", "40k", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert f"{GOOD_SAMPLES} samples" in text and "4 of 1000 classes" in text
    assert "skipped n01440764/n01440764_9002.JPEG" in text and "converted to RGB when loaded" in text
    assert main(["prepare-imagenet", str(mini_src), str(out), "--shard-size", "80k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adm prepare-imagenet: error: ") and "other options" in err
    assert main(["prepare-imagenet", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
