"""Streaming npz reads equal np.load; bad sample files are refused with the fix; reference batches."""
from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest

from evaluation import io as eio


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (53, 9, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_streaming_reader_equals_np_load(tmp_path, images, writer):
    path = tmp_path / "s.npz"
    labels = np.arange(53) % 10
    writer(path, images, labels)
    loaded = np.load(path)
    with eio.open_images(path) as arr:
        assert arr.shape == images.shape and arr.dtype == np.uint8 and len(arr) == 53
        np.testing.assert_array_equal(np.concatenate([b for _, b in arr.batches(10)]), loaded["arr_0"])
        assert [i for i, _ in arr.batches(10, start=5, stop=33)] == [5, 15, 25]
        np.testing.assert_array_equal(arr.read(40, 999), loaded["arr_0"][40:])  # clipped at the end
        np.testing.assert_array_equal(arr.read(3, 4), loaded["arr_0"][3:4])     # backwards after forwards
    np.testing.assert_array_equal(eio.read_labels(path, 53), loaded["arr_1"])
    assert eio.read_labels(path, 53).dtype == np.int64


def test_npy_version_2_header_and_scalars(tmp_path, images):
    path = tmp_path / "v2.npz"
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, images, version=(2, 0))
        z.writestr("arr_0.npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.array(3.5))
        z.writestr("scalar.npy", buf.getvalue())
    with eio.open_images(path) as arr:
        np.testing.assert_array_equal(arr.read(), images)
    assert eio.read_array(path, "scalar") == 3.5


def test_batches_do_not_hold_the_whole_file(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, (400, 64, 64, 3), dtype=np.uint8)  # 4.9 MB
    path = tmp_path / "big.npz"
    np.savez(path, big)
    del big
    tracemalloc.start()
    with eio.open_images(path) as arr:
        total = 0
        for _, batch in arr.batches(8):
            total += int(batch[..., 0].sum())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # a few batches of 98 kB, never the 4.9 MB array


@pytest.mark.parametrize("array,match", [
    (np.zeros((4, 8, 8, 3), np.float32), "uint8 pixels"),
    (np.zeros((4, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((4, 8, 8), np.uint8), "greyscale"),
    (np.zeros((4, 8, 8, 1), np.uint8), "greyscale"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
    (np.zeros((4, 8, 8, 3), np.int64), "uint8"),
])
def test_bad_sample_arrays_are_refused(tmp_path, array, match):
    path = tmp_path / "bad.npz"
    np.savez(path, array)
    with pytest.raises(ValueError, match=match):
        eio.open_images(path)


def test_bad_files(tmp_path, images):
    with pytest.raises(FileNotFoundError):
        eio.open_images(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz"):
        eio.open_images(tmp_path / "text.npz")
    np.savez(tmp_path / "named.npz", images=images)
    with pytest.raises(ValueError, match="no array 'arr_0'.*images"):
        eio.open_images(tmp_path / "named.npz")
    np.savez(tmp_path / "fortran.npz", np.asfortranarray(images))
    with pytest.raises(ValueError, match="Fortran"):
        eio.open_images(tmp_path / "fortran.npz")
    np.savez(tmp_path / "labels.npz", images, np.zeros(5))
    with pytest.raises(ValueError, match="53 integer class labels"):
        eio.read_labels(tmp_path / "labels.npz", 53)
    np.savez(tmp_path / "nolabels.npz", images)
    assert eio.read_labels(tmp_path / "nolabels.npz", 53) is None


def test_reference_batch_round_trip(tmp_path, images):
    rng = np.random.default_rng(2)
    stats = {"mu": rng.normal(size=6), "sigma": np.eye(6), "mu_s": rng.normal(size=4), "sigma_s": np.eye(4) * 2}
    path = tmp_path / "ref.npz"
    eio.write_reference_batch(path, images, np.arange(53), stats)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    got = eio.read_reference_stats(path)
    for key, value in stats.items():
        np.testing.assert_array_equal(got[key], value)
    loaded = np.load(path)
    np.testing.assert_array_equal(loaded["arr_0"], images)
    np.testing.assert_array_equal(loaded["arr_1"], np.arange(53))
    eio.write_reference_batch(tmp_path / "plain.npz", images)
    assert eio.read_reference_stats(tmp_path / "plain.npz") is None
    with pytest.raises(ValueError, match="unknown statistics"):
        eio.write_reference_batch(tmp_path / "x.npz", images, stats={"mean": np.zeros(3)})
    with pytest.raises(ValueError, match="uint8"):
        eio.write_reference_batch(tmp_path / "x.npz", images.astype(np.float32))
