"""prepare-imagenet on a miniature ImageNet of real images: counts, labels, determinism, resume, bad input."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data.classes import imagenet_index
from data.miniature import make_miniature_imagenet, miniature_files
from data.prepare import prepare_imagenet
from data.shards import iter_raw_samples

from .conftest import GOOD_SAMPLES, NUM_CLASSES, tree_digest


def _samples(folder: Path) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [s for shard in manifest["shards"] for s in iter_raw_samples(str(folder / shard["name"]))]


def test_counts_labels_and_original_bytes(mini_src, mini_shards):
    manifest = json.loads((mini_shards / "manifest.json").read_text())
    assert manifest["num_samples"] == GOOD_SAMPLES
    assert manifest["num_classes"] == 1000 and manifest["imagenet_classes"]
    assert sum(manifest["classes"].values()) == GOOD_SAMPLES
    assert len(manifest["classes"]) == NUM_CLASSES and len(manifest["missing_classes"]) == 1000 - NUM_CLASSES
    # 38 files planned 4 per shard; the two skipped files leave two shards with 3.
    assert len(manifest["shards"]) == 10 and sorted(s["count"] for s in manifest["shards"]) == [2, 3, 3] + [4] * 7
    assert sorted(s["path"] for s in manifest["skipped"]) == [
        "n01440764/n01440764_9002.JPEG",  # truncated JPEG
        "n02085620/n02085620_9002.txt",  # not an image
    ]
    # Greyscale, CMYK and alpha images are kept as they are and converted when loaded.
    assert manifest["formats"]["JPEG:L"] == 1 and manifest["formats"]["JPEG:CMYK"] == 1
    assert manifest["formats"]["PNG:RGBA"] == 1 and manifest["converted_to_rgb_when_loaded"] == 3
    samples = _samples(mini_shards)
    assert len(samples) == GOOD_SAMPLES == len({s["__key__"] for s in samples})
    index = imagenet_index()
    for s in samples:
        wnid = s["wnid"].decode()
        assert int(s["cls"]) == index[wnid]
        assert s["__key__"].startswith(wnid)
        ext = "jpg" if "jpg" in s else "png"
        original = [p for p in (mini_src / wnid).iterdir() if p.name.split(".")[0] == s["__key__"]]
        assert len(original) == 1 and original[0].read_bytes() == s[ext]  # original bytes, not re-encoded
    # Shards mix classes: the fixed-seed shuffle spreads each class over several shards.
    first = [int(s["cls"]) for s in samples[:8]]
    assert len(set(first)) > 1
    # The PNG named .JPEG is stored as .png.
    assert any("png" in s and s["__key__"] == "n15075141_9001" for s in samples)


def test_train_tar_gives_byte_identical_shards(mini_root, mini_tar, mini_shards):
    out = mini_root / "from-tar"
    manifest = prepare_imagenet(mini_tar, out, samples_per_shard=4, workers=2)
    assert manifest["layout"] == "train-tar"
    for shard in manifest["shards"]:
        assert (out / shard["name"]).read_bytes() == (mini_shards / shard["name"]).read_bytes()


def test_rerun_is_noop_and_other_options_are_refused(mini_root, mini_src):
    out = mini_root / "rerun"
    first = prepare_imagenet(mini_src, out, samples_per_shard=4)
    before = tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert prepare_imagenet(mini_src, out, samples_per_shard=4) == first
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    with pytest.raises(ValueError, match="other options.*samples_per_shard: 4 there, 5 now"):
        prepare_imagenet(mini_src, out, samples_per_shard=5)
    with pytest.raises(ValueError, match="other options.*resize_short_side"):
        prepare_imagenet(mini_src, out, samples_per_shard=4, resize_short_side=32)
    assert tree_digest(out) == before  # nothing written, nothing lost
    (out / "train-000003.tar").unlink()  # lost after completion: a rerun restores it exactly
    prepare_imagenet(mini_src, out, samples_per_shard=4)
    assert tree_digest(out) == before


def test_resume_after_simulated_crash_states(mini_root, mini_src):
    """Every state a crash can leave: no manifest, a shard without its record, a torn shard, temp files."""
    ref = mini_root / "crash-ref"
    prepare_imagenet(mini_src, ref, samples_per_shard=3)
    out = mini_root / "crash"
    shutil.copytree(ref, out)
    (out / "manifest.json").unlink()
    (out / ".prepare" / "train-000002.tar.json").unlink()  # killed between shard rename and record
    torn = out / "train-000004.tar"
    torn.write_bytes(torn.read_bytes()[:700])  # a shard that does not match its record
    (out / "train-000007.tar").unlink()
    (out / ".train-000007.tar.abc123.tmp").write_bytes(b"partial")
    prepare_imagenet(mini_src, out, samples_per_shard=3, workers=2)
    assert tree_digest(out) == tree_digest(ref)


def test_foreign_shards_in_out_are_refused(tmp_path, mini_src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(ValueError, match="not made by this tool"):
        prepare_imagenet(mini_src, out, samples_per_shard=4)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's shard"


def test_changed_source_is_refused(tmp_path):
    src = make_miniature_imagenet(tmp_path / "src", 2, 3, bad_files=False)
    out = tmp_path / "out"
    prepare_imagenet(src, out, samples_per_shard=2)
    (out / "manifest.json").unlink()  # pretend the run was interrupted
    shutil.copy(src / "n01440764" / "n01440764_1000.JPEG", src / "n01440764" / "n01440764_2000.JPEG")
    with pytest.raises(ValueError, match="changed since the shards"):
        prepare_imagenet(src, out, samples_per_shard=2)


def test_shard_size_in_bytes_plans_by_file_size(tmp_path, mini_src):
    manifest = prepare_imagenet(mini_src, tmp_path / "out", shard_size=20_000)
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 2 and sum(s["count"] for s in manifest["shards"]) == GOOD_SAMPLES
    # Planned from source sizes: every shard but the last is filled close to the target, none far over.
    assert all(size <= 20_000 + 10_240 for size in sizes)


def test_resize_short_side_stores_adm_halvings(tmp_path, mini_src):
    manifest = prepare_imagenet(mini_src, tmp_path / "out", samples_per_shard=8, resize_short_side=24)
    samples = _samples(tmp_path / "out")
    assert manifest["num_samples"] == GOOD_SAMPLES
    for s in samples:
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and 24 <= min(img.size) < 48


def test_partial_and_custom_classes(tmp_path):
    files = miniature_files(num_classes=3, per_class=2, bad_files=False)
    src = tmp_path / "custom"
    for i, (wnid, entries) in enumerate(files.items()):
        for name, data in entries.items():
            (src / ["cats", "dogs", "birds"][i]).mkdir(parents=True, exist_ok=True)
            (src / ["cats", "dogs", "birds"][i] / name).write_bytes(data)
    with pytest.raises(ValueError, match="not among the 1000 ImageNet WNIDs.*--allow-custom-classes"):
        prepare_imagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = prepare_imagenet(src, tmp_path / "out", allow_custom_classes=True)
    assert manifest["class_list"] == ["birds", "cats", "dogs"] and manifest["num_classes"] == 3
    assert not manifest["missing_classes"] and not manifest["imagenet_classes"]
    assert sorted({int(s["cls"]) for s in _samples(tmp_path / "out")}) == [0, 1, 2]


def test_val_folder_and_tar_with_label_files(tmp_path):
    files = miniature_files(num_classes=2, per_class=3, bad_files=False)
    flat = tmp_path / "val"
    flat.mkdir()
    names = {}
    for n, (wnid, entries) in enumerate(sorted((w, e) for w, es in files.items() for e in es.items())):
        name = f"ILSVRC2012_val_{n + 1:08d}.JPEG"
        (flat / name).write_bytes(entries[1])
        names[name] = wnid
    (flat / "ILSVRC2012_val_00000099.JPEG").write_bytes(next(iter(files[wnid].values())))  # unlabelled
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(f"{n[:-5]},{w} 1 2 3 4 {w} 5 6 7 8\n" for n, w in names.items()))
    lines = tmp_path / "val.txt"
    lines.write_text("".join(f"{n} {imagenet_index()[w]}\n" for n, w in names.items()))  # Caffe's val.txt
    m1 = prepare_imagenet(flat, tmp_path / "o1", split="val", val_labels=kaggle)
    assert m1["num_samples"] == 6 and m1["layout"] == "val-folder"
    assert m1["skipped"] == [{"path": "ILSVRC2012_val_00000099.JPEG", "reason": "no label in the --val-labels file"}]
    assert (tmp_path / "o1" / "val-000000.tar").exists()
    got = {s["__key__"]: s["wnid"].decode() for s in _samples(tmp_path / "o1")}
    assert got == {n[:-5]: w for n, w in names.items()}
    tar_path = tmp_path / "val.tar"
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted(flat.iterdir()):
            tar.add(p, arcname=p.name)
    m2 = prepare_imagenet(tar_path, tmp_path / "o2", split="val", val_labels=lines)
    assert m2["layout"] == "val-tar"
    assert (tmp_path / "o1" / "val-000000.tar").read_bytes() == (tmp_path / "o2" / "val-000000.tar").read_bytes()
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    with pytest.raises(ValueError, match="devkit"):
        prepare_imagenet(flat, tmp_path / "o3", split="val", val_labels=devkit)
    with pytest.raises(ValueError, match="--val-labels"):
        prepare_imagenet(flat, tmp_path / "o4", split="val")


def test_bad_sources_give_clear_errors(tmp_path, mini_src):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_imagenet(tmp_path / "missing", tmp_path / "o")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown layout"):
        prepare_imagenet(flat, tmp_path / "o")
    not_tar = tmp_path / "file.bin"
    not_tar.write_bytes(b"\x00" * 10 + b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        prepare_imagenet(not_tar, tmp_path / "o")
    flat_tar = tmp_path / "flat.tar"
    with tarfile.open(flat_tar, "w") as tar:
        tar.add(flat / "a.JPEG", arcname="a.JPEG")
    with pytest.raises(ValueError, match="unknown layout"):
        prepare_imagenet(flat_tar, tmp_path / "o")
    outside = tmp_path / "outside"
    shutil.copytree(mini_src / "n01440764", outside / "n01440764")
    shutil.copytree(mini_src / "n02085620", outside / "n99999999")
    with pytest.raises(ValueError, match="not among the 1000 ImageNet WNIDs: 'n99999999'"):
        prepare_imagenet(outside, tmp_path / "o")
    empty = tmp_path / "empty"
    shutil.copytree(mini_src / "n01440764", empty / "n01440764")
    (empty / "n02085620").mkdir()
    with pytest.raises(ValueError, match="n02085620 hold no files"):
        prepare_imagenet(empty, tmp_path / "o")
    with pytest.raises(ValueError, match="choose one of resize_short_side"):
        prepare_imagenet(mini_src, tmp_path / "o", resize_short_side=64, center_crop=64)
    with pytest.raises(ValueError, match="resize_format"):
        prepare_imagenet(mini_src, tmp_path / "o", resize_short_side=64, resize_format="webp")
    with pytest.raises(ValueError, match="split"):
        prepare_imagenet(mini_src, tmp_path / "o", split="test")
    assert not (tmp_path / "o").exists()  # nothing was created for any bad input
