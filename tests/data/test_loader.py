"""ShardLoader on real shards: exact resume, node x worker partition, corrupt data, shard specs."""
from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.loader import ShardLoader
from data.prepare import prepare_imagenet
from data.shards import ShardReadError, iter_raw_samples
from data.transforms import simplejpeg_matches_pillow

from .conftest import GOOD_SAMPLES


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _manifest_keys(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [s["__key__"] for sh in manifest["shards"] for s in iter_raw_samples(str(folder / sh["name"]))]


def test_batches_shapes_labels_and_metadata(mini_shards):
    loader = ShardLoader(mini_shards, image_size=16, batch_size=4, seed=1)
    assert loader.num_classes == 1000 and loader.classes[0] == "n01440764"
    assert loader.class_names[1] == "goldfish, Carassius auratus" and loader.num_samples == GOOD_SAMPLES
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1
    assert batch["labels"].dtype == torch.int64 and len(batch["keys"]) == 4
    manifest = json.loads((mini_shards / "manifest.json").read_text())
    from data.classes import imagenet_index

    wnid_of_key = {k: k.split("_")[0] for k in _manifest_keys(mini_shards)}
    assert [imagenet_index()[wnid_of_key[k]] for k in batch["keys"]] == batch["labels"].tolist()
    assert manifest["num_samples"] == GOOD_SAMPLES
    u8 = next(iter(ShardLoader(mini_shards, 16, 4, seed=1, output="uint8")))
    assert u8["images"].dtype == torch.uint8 and u8["keys"] == batch["keys"]
    assert torch.equal(u8["images"].float() / 127.5 - 1, batch["images"])


@pytest.mark.parametrize("workers,mode", [(2, "random-crop"), (0, "center")])
def test_resume_yields_exactly_the_uninterrupted_sequence(mini_shards, workers, mode):
    kwargs = dict(image_size=16, batch_size=4, num_workers=workers, seed=7, mode=mode, shuffle_buffer=6)
    full = _take(ShardLoader(mini_shards, **kwargs), 23)  # 92 samples: more than two epochs
    first = ShardLoader(mini_shards, **kwargs)
    part1 = _take(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    resumed = ShardLoader(mini_shards, **kwargs)
    resumed.load_state_dict(state)
    part2 = _take(resumed, 14)
    assert [b["keys"] for b in part1 + part2] == [b["keys"] for b in full]
    for a, b in zip(part1 + part2, full):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # Each epoch holds every sample exactly once.
    epoch0 = [k for b in full for k, e in zip(b["keys"], b["epochs"].tolist()) if e == 0]
    assert Counter(epoch0) == Counter(_manifest_keys(mini_shards))


def test_two_nodes_two_workers_see_every_sample_once_per_epoch(mini_shards):
    seen = Counter()
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(mini_shards, 8, batch_size=3, rank=rank, world_size=2, num_workers=2, seed=3, shuffle_buffer=4)
        batches = _take(loader, 16)  # 8 batches per worker = 24 samples >= any reader's epoch
        keys = [k for b in batches for k, e in zip(b["keys"], b["epochs"].tolist()) if e == 0]
        per_rank.append(set(keys))
        seen.update(keys)
    assert seen == Counter(_manifest_keys(mini_shards))  # every sample exactly once
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    # Another epoch uses another shard order.
    orders = [ShardLoader(mini_shards, 8, 3, rank=0, world_size=2, seed=3) for _ in range(1)]
    from data.loader import epoch_shards

    cfg = orders[0]._cfg
    assert epoch_shards(cfg, 0, 0) != epoch_shards(cfg, 1, 0)


def test_shard_arguments_folder_glob_brace_list_manifest_pipe(mini_shards):
    def keys(spec):
        loader = ShardLoader(spec, 8, 2, seed=0, shuffle_buffer=1, flip=False)
        return Counter(k for b in _take(loader, GOOD_SAMPLES // 2) for k in b["keys"])

    expected = keys(mini_shards)
    assert expected == Counter(_manifest_keys(mini_shards))
    names = sorted(p.name for p in mini_shards.glob("train-*.tar"))
    assert keys(str(mini_shards / "train-*.tar")) == expected
    assert keys(str(mini_shards / "train-{000000..000009}.tar")) == expected
    assert keys([str(mini_shards / n) for n in names]) == expected
    assert keys(str(mini_shards / "manifest.json")) == expected
    assert keys(f"file://{mini_shards}/train-{{000000..000009}}.tar") == expected
    assert keys([f"pipe:cat {mini_shards / n}" for n in names]) == expected


def test_fsspec_url_folder_with_manifest(mini_shards):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in mini_shards.iterdir():
        if path.is_file():
            fs.pipe(f"/adm-test-shards/{path.name}", path.read_bytes())
    try:
        loader = ShardLoader("memory://adm-test-shards/", 8, 4, seed=0, shuffle_buffer=1)
        assert loader.num_samples == GOOD_SAMPLES and loader.num_classes == 1000
        keys = Counter(k for b in _take(loader, GOOD_SAMPLES // 4) for k in b["keys"])
        assert keys == Counter(_manifest_keys(mini_shards))
    finally:
        fs.rm("/adm-test-shards", recursive=True)


def _copy_with_corrupt_sample(src: Path, dst: Path) -> None:
    dst.mkdir()
    for i, shard in enumerate(sorted(src.glob("train-*.tar"))):
        data = shard.read_bytes()
        if i == 0:
            members = list(iter_raw_samples(str(shard)))
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for n, sample in enumerate(members):
                    if n == 1:
                        sample = dict(sample, jpg=sample.get("jpg", b"\xff\xd8\xff")[:300])  # truncated JPEG
                        sample.pop("png", None)
                    for field in ("jpg", "png", "cls", "wnid"):
                        if field in sample:
                            info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                            info.size = len(sample[field])
                            tar.addfile(info, io.BytesIO(sample[field]))
            data = buf.getvalue()
        (dst / shard.name).write_bytes(data)


def test_corrupt_sample_is_skipped_counted_and_logged(tmp_path, mini_shards, caplog):
    bad = tmp_path / "bad"
    _copy_with_corrupt_sample(mini_shards, bad)
    loader = ShardLoader(str(bad / "train-*.tar"), 8, 5, seed=0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        batches = _take(loader, 7)  # 35 good samples = one epoch
    assert loader.stats["corrupt"] == 1
    assert any("skipping corrupt sample" in r.getMessage() for r in caplog.records)
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == GOOD_SAMPLES - 1


def test_unreadable_shard_is_an_error_naming_it_unless_skipped(tmp_path, mini_shards):
    bad = tmp_path / "torn"
    bad.mkdir()
    for shard in sorted(mini_shards.glob("train-*.tar")):
        (bad / shard.name).write_bytes(shard.read_bytes())
    torn = bad / "train-000003.tar"
    torn.write_bytes(torn.read_bytes()[:1200])  # cut inside a member
    with pytest.raises(ShardReadError, match="train-000003.tar"):
        _take(ShardLoader(str(bad / "*.tar"), 8, 4, seed=0), 20)
    with pytest.raises(Exception, match="train-000003.tar"):  # re-raised from a DataLoader worker
        _take(ShardLoader(str(bad / "*.tar"), 8, 4, seed=0, num_workers=1), 20)
    loader = ShardLoader(str(bad / "*.tar"), 8, 4, seed=0, skip_bad_shards=True)
    assert len(_take(loader, 12)) == 12 and loader.stats["bad_shards"] >= 1


def test_truncated_shard_caught_by_manifest_count(tmp_path, mini_src):
    out = tmp_path / "shards"
    prepare_imagenet(mini_src, out, samples_per_shard=4)
    shard = out / "train-000000.tar"
    members = []
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut exactly after the first sample's three members: a clean tar end, one sample short.
    cut = members[3].offset
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardReadError, match="train-000000.tar holds 1 samples but its manifest says 4"):
        _take(ShardLoader(out, 8, 4, seed=0), 12)


def test_bad_arguments_and_mismatched_state(mini_shards, tmp_path):
    with pytest.raises(ValueError, match="10 shards cannot feed world_size x num_workers = 4 x 3"):
        ShardLoader(mini_shards, 8, 4, rank=0, world_size=4, num_workers=3)
    with pytest.raises(ValueError, match="mode"):
        ShardLoader(mini_shards, 8, 4, mode="centre")
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(mini_shards, 8, 4, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        ShardLoader(str(tmp_path / "nothing-*.tar"), 8, 4)
    with pytest.raises(FileNotFoundError, match="run `adm prepare-imagenet"):
        ShardLoader(tmp_path, 8, 4)
    state = ShardLoader(mini_shards, 8, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        ShardLoader(mini_shards, 8, 4, seed=1, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size: saved 4, now 8"):
        ShardLoader(mini_shards, 8, 8, seed=1).load_state_dict(state)


def test_pre_resized_shards_give_identical_batches(tmp_path, mini_src, mini_shards):
    resized = tmp_path / "resized"
    prepare_imagenet(mini_src, resized, samples_per_shard=4, resize_short_side=24)
    raw = tmp_path / "raw"
    prepare_imagenet(mini_src, raw, samples_per_shard=4, resize_short_side=24, resize_format="npy")
    for size in (16, 24):
        a = _take(ShardLoader(mini_shards, size, 6, seed=2), 6)
        for folder in (resized, raw):
            b = _take(ShardLoader(folder, size, 6, seed=2), 6)
            for x, y in zip(a, b):
                assert x["keys"] == y["keys"]
                assert torch.equal(x["images"], y["images"])  # bit-identical to ADM's preprocessing
    with pytest.raises(ValueError, match="pre-resized to short side 24"):
        ShardLoader(resized, 32, 4)
    cropped = tmp_path / "cropped"
    prepare_imagenet(mini_src, cropped, samples_per_shard=4, center_crop=16, resize_format="npy")
    a = _take(ShardLoader(mini_shards, 16, 6, seed=2), 6)
    b = _take(ShardLoader(cropped, 16, 6, seed=2), 6)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="centre crops of 16 px"):
        ShardLoader(cropped, 16, 4, mode="random-crop")


def test_draft_decoder_is_close_to_exact(mini_shards):
    exact = _take(ShardLoader(mini_shards, 16, 6, seed=2, decoder="pil"), 6)
    if simplejpeg_matches_pillow():
        fast = _take(ShardLoader(mini_shards, 16, 6, seed=2, decoder="simplejpeg"), 6)
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(exact, fast))
    draft = _take(ShardLoader(mini_shards, 16, 6, seed=2, decoder="pil-draft"), 6)
    diffs = [((x["images"] - y["images"]).abs().mean().item()) for x, y in zip(exact, draft)]
    assert all(x["keys"] == y["keys"] for x, y in zip(exact, draft))
    # Not bit-identical (DCT-domain scaling instead of BOX halving), but close: mean |difference| in
    # [-1, 1] units, under ~13 of 255 levels on these sharp-edged digits (bench/data_loading.py measures photos).
    assert 0 < max(diffs) < 0.1
