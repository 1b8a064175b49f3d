"""Sample files: shards, the streamed .npz (read back the way guided-diffusion's evaluator reads it), grid."""
from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from launch.sample import files as sf
from runtime.npz import NpzArray, read_array, write_streamed_npz


def _evaluator_rows(path, name, batch):
    """Read an array the way the original evaluator streams it: zip member, npy header, raw rows."""
    with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zf:
        assert f"{name}.npy" in zf.namelist()
        with zf.open(f"{name}.npy", "r") as member:
            version = np.lib.format.read_magic(member)
            assert version in ((1, 0), (2, 0))
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(member)
            assert not fortran
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            out = []
            for start in range(0, shape[0], batch):
                n = min(batch, shape[0] - start)
                out.append(np.frombuffer(member.read(n * row), dtype=dtype).reshape(n, *shape[1:]))
            return np.concatenate(out), dtype


def test_streamed_npz_is_what_np_savez_writes_and_reads_like_the_evaluator(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 11).astype(np.int64)
    ours = tmp_path / "ours.npz"
    write_streamed_npz(ours, [images[:4], images[4:9], images[9:]], [labels[:7], labels[7:]], 11, (6, 5, 3))
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=labels)
    with np.load(ours) as z:
        assert z.files == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (11, 6, 5, 3)
        assert z["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    arr0, dtype = _evaluator_rows(ours, "arr_0", batch=4)
    assert dtype == np.uint8
    np.testing.assert_array_equal(arr0, images)
    # The same archive np.savez writes, byte for byte (uncompressed members, zip64 headers).
    if (tmp_path / "ref.npz").read_bytes() != ours.read_bytes():
        with zipfile.ZipFile(ours) as a, zipfile.ZipFile(tmp_path / "ref.npz") as b:
            assert [i.compress_type for i in a.infolist()] == [zipfile.ZIP_STORED] * 2
            for name in ("arr_0.npy", "arr_1.npy"):
                assert a.read(name) == b.read(name)


def test_streamed_npz_refuses_a_wrong_row_count(tmp_path):
    images = np.zeros((3, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="expected 4"):
        write_streamed_npz(tmp_path / "x.npz", [images], [np.zeros(3, np.int64)], 4, (2, 2, 3))
    assert not (tmp_path / "x.npz").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_merge_holds_one_shard_at_a_time(tmp_path):
    """Peak Python/numpy memory of the merge stays near one shard although the file holds 12."""
    rng = np.random.default_rng(1)
    per, shape, count = 64, (64, 64, 3), 12
    files, expect = [], []
    for k in range(count):
        images = rng.integers(0, 256, (per, *shape), dtype=np.uint8)
        labels = np.arange(k * per, (k + 1) * per, dtype=np.int64)
        path = sf.shard_path(tmp_path, k)
        sf.write_shard(path, images, labels, start=k * per, options_hash="h", network_batch=8)
        files.append(path)
        expect.append(images[:2].copy())
    shard_bytes = per * int(np.prod(shape))
    out = tmp_path / sf.samples_file_name(per * count, shape)
    tracemalloc.start()
    try:
        sf.merge_shards(files, out, per * count, shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = shard_bytes * count
    assert peak < 2 * shard_bytes < total / 5, (peak, shard_bytes, total)
    with NpzArray(out, "arr_0") as arr:
        assert arr.shape == (per * count, *shape)
        for k in range(count):
            np.testing.assert_array_equal(arr[k * per:k * per + 2], expect[k])
        np.testing.assert_array_equal(arr[np.array([per, 0])], np.stack([expect[1][0], expect[0][0]]))
    np.testing.assert_array_equal(read_array(out, "arr_1"), np.arange(per * count))


def test_npz_rows_read_from_compressed_files_too(tmp_path):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    with NpzArray(tmp_path / "c.npz", "arr_0") as arr:
        np.testing.assert_array_equal(arr[0:2], images)
    with pytest.raises(ValueError, match="no array 'arr_1'"):
        NpzArray(tmp_path / "c.npz", "arr_1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NpzArray(tmp_path / "missing.npz", "arr_0")


def test_shard_validation_and_stale_temporaries(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    path = sf.shard_path(tmp_path, 2)
    sf.write_shard(path, images, np.array([1, 2, 3]), start=6, options_hash="abc", network_batch=2)
    assert sf.read_shard_meta(path) == {"start": 6, "count": 3, "image_shape": (4, 4, 3), "dtype": np.uint8,
                                        "options_hash": "abc", "network_batch": 2}
    assert sf.shard_is_valid(path, 6, 3, (4, 4, 3), "abc")
    assert not sf.shard_is_valid(path, 6, 3, (4, 4, 3), "other options")
    assert not sf.shard_is_valid(path, 3, 3, (4, 4, 3), "abc")
    assert not sf.shard_is_valid(path, 6, 2, (4, 4, 3), "abc")
    assert not sf.shard_is_valid(sf.shard_path(tmp_path, 3), 9, 3, (4, 4, 3), "abc")
    (path.parent / ".shard-000003.npz.x1y2.tmp").write_bytes(b"half a shard")
    assert sf.list_shard_files(tmp_path) == [path]
    assert sf.remove_stale_temporaries(tmp_path) == 1
    assert not list(path.parent.glob(".*.tmp"))


def test_to_uint8_truncates_like_the_original_or_rounds():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    trunc = sf.to_uint8(x, "truncate")
    assert trunc.shape == (1, 1, 6, 3) and trunc.dtype == torch.uint8
    assert trunc[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    assert sf.to_uint8(x, "round")[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]
    with pytest.raises(ValueError, match="rounding"):
        sf.to_uint8(x, "floor")


def test_grid_png(tmp_path):
    images = np.stack([np.full((4, 4, 3), 20 * k, np.uint8) for k in range(5)])
    sf.write_grid(tmp_path / "grid.png", images, pad=1)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)  # 5 images -> 3 columns, 2 rows
    assert (grid[1:5, 6:10] == 20).all() and (grid[6:10, 1:5] == 60).all()
