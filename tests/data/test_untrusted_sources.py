"""Datasets from someone else: image bombs are refused before decoding, and every tar member that is
not taken (links, '..' and absolute paths, special and hidden members) is listed in the manifest
with its reason instead of vanishing. Real files through `prepare_imagenet`, real decoding."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.prepare import prepare_imagenet
from data.transforms import MAX_IMAGE_PIXELS, ImageTooLarge, decode_image

ROOT = Path(__file__).resolve().parents[2]


def _png(size: tuple[int, int], mode: str = "RGB", value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 20000x20000 PNG of a few tens of kB (1-bit, so making it costs 50 MB here, not 1.2 GB)."""
    data = _png((20000, 20000), mode="1")
    assert len(data) < 100_000
    return data


def test_a_bomb_is_refused_before_decoding(bomb, tmp_path):
    with pytest.raises(ImageTooLarge, match="400,000,000 pixels"):
        decode_image(bomb)
    assert decode_image(_png((64, 48))).size == (64, 48)
    # Peak memory of the refusal, in a fresh process: the 1.2 GB RGB decode never happens.
    (tmp_path / "bomb.png").write_bytes(bomb)
    code = ("import resource, sys; from data.transforms import decode_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    decode_image(open(sys.argv[1], 'rb').read())\nexcept ValueError as e:\n    print('refused')\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.png")], env=env, capture_output=True,
                         text=True, timeout=120)
    lines = out.stdout.split()
    assert lines[0] == "refused", out.stderr
    assert int(lines[1]) < 50_000, f"{lines[1]} kB more memory for a refused image"


def test_oversized_npy_and_jpeg_are_refused_too():
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (side, side, 3)})
    with pytest.raises(ImageTooLarge):  # refused from the header: side*side*3 bytes are never allocated
        decode_image(head.getvalue())
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (8, 8, 3)})
    with pytest.raises(ValueError, match="needs 192 bytes"):  # a header that does not match its data
        decode_image(head.getvalue() + b"x" * 10)
    small = io.BytesIO()
    np.save(small, np.full((4, 5, 3), 7, np.uint8))
    assert np.asarray(decode_image(small.getvalue())).tolist() == np.full((4, 5, 3), 7).tolist()
    big = io.BytesIO()
    Image.new("L", (side, 2)).save(big, format="JPEG")  # wide but short: few pixels, allowed
    assert decode_image(big.getvalue()).size == (side, 2)


def test_prepare_skips_and_lists_a_bomb(bomb, tmp_path):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    for i in range(3):
        (src / "cat" / f"c{i}.png").write_bytes(_png((20, 20), value=10 * i))
        (src / "dog" / f"d{i}.png").write_bytes(_png((20, 20), value=100 + i))
    (src / "dog" / "bomb.png").write_bytes(bomb)
    manifest = prepare_imagenet(src, tmp_path / "out", samples_per_shard=4, allow_custom_classes=True, workers=2)
    assert manifest["num_samples"] == 6
    assert [s["path"] for s in manifest["skipped"]] == ["dog/bomb.png"]
    assert "image too large: 400,000,000 pixels" in manifest["skipped"][0]["reason"]


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_every_dropped_tar_member_is_listed_with_its_reason(tmp_path):
    path = tmp_path / "src.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "cat", kind=tarfile.DIRTYPE)
        for i in range(2):
            _add(tar, f"cat/c{i}.png", _png((20, 20), value=i))
            _add(tar, f"dog/d{i}.png", _png((20, 20), value=50 + i))
        _add(tar, "cat/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "cat/hard.png", kind=tarfile.LNKTYPE, link="cat/c0.png")
        _add(tar, "../escape/x.png", _png((20, 20)))
        _add(tar, "/abs/y.png", _png((20, 20)))
        _add(tar, "dog//z.png", _png((20, 20)))
        _add(tar, "dog/.hidden.png", _png((20, 20)))
        _add(tar, "dog/fifo", kind=tarfile.FIFOTYPE)
    manifest = prepare_imagenet(path, tmp_path / "out", samples_per_shard=4, allow_custom_classes=True, workers=1)
    assert manifest["class_list"] == ["cat", "dog"] and manifest["num_samples"] == 4  # no '' class, no 'abs'
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"cat/link.png", "cat/hard.png", "../escape/x.png", "/abs/y.png", "dog//z.png",
                            "dog/.hidden.png", "dog/fifo"}
    assert "symbolic link" in reasons["cat/link.png"] and "hard link" in reasons["cat/hard.png"]
    assert "'..'" in reasons["../escape/x.png"] and "absolute" in reasons["/abs/y.png"]
    assert "empty path component" in reasons["dog//z.png"] and "hidden" in reasons["dog/.hidden.png"]
    assert "not a regular file" in reasons["dog/fifo"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]


def test_members_of_the_per_class_tars_are_listed_too(tmp_path):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(2):
            _add(tar, f"n01440764_{i}.JPEG", _png((20, 20), value=i))
        _add(tar, "n01440764_9.JPEG", kind=tarfile.SYMTYPE, link="../../etc/shadow")
    path = tmp_path / "train.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "n01440764.tar", inner.getvalue())
    manifest = prepare_imagenet(path, tmp_path / "out", samples_per_shard=4, workers=1)
    assert manifest["num_samples"] == 2
    assert [(s["path"], "symbolic link" in s["reason"]) for s in manifest["skipped"]] == [
        ("n01440764.tar/n01440764_9.JPEG", True)]


@pytest.mark.parametrize("name", ["../elsewhere/train-0.tar", "/etc/passwd", "sub/dir.tar", "..", "pipe:touch x",
                                  "a\nb.tar"])
def test_a_manifest_names_only_files_of_its_folder(tmp_path, name):
    from data.shards import resolve_shards

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "adm-shards/1", "shards": [{"name": name, "count": 1}]}))
    with pytest.raises(ValueError, match="may only name files in its own folder"):
        resolve_shards(str(folder))
