"""Sample files from someone else: a corrupt or forged `.npz` is refused in one line, never scored.

Crafted files: one flipped byte inside the image data (the zip CRC no longer matches; `np.load` refuses
such a file), a header claiming more rows than its member holds (it used to read the next member's
bytes as images), a header claiming 1e12 labels (it used to raise MemoryError), a garbage zip. They
go through the real evaluator: one process, and two gloo processes that each read half the file and
combine their CRCs. The CRC check is streaming: memory stays at one chunk.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from evaluation.evaluate import evaluate
from launch.cli import main as adm
from runtime.npz import NpzArray, check_crc_runs, crc32_combine, npz_keys, read_array

ROOT = Path(__file__).resolve().parents[2]


def _flip(path: Path, marker: bytes, offset: int) -> None:
    """Flip one bit at `offset` bytes past where `marker` (the start of some array data) sits."""
    raw = bytearray(path.read_bytes())
    at = raw.find(marker)
    assert at >= 0
    raw[at + offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _rewrite_header(path: Path, old: str, new: str) -> None:
    """Replace text in an .npy header, keeping its padded length (so the zip offsets stay valid)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(old.encode())
    assert at >= 0
    end = raw.find(b"\n", at)
    line = raw[at:end].decode().replace(old, new).rstrip(" ")
    padded = line + " " * (end - at - len(line))
    assert len(padded) == end - at, "no room in the header padding"
    raw[at:end] = padded.encode()
    path.write_bytes(bytes(raw))


def _forge(path: Path, arrays: dict[str, tuple[np.ndarray, tuple[int, ...]]]) -> None:
    """An .npz whose members hold `array`'s bytes under a header claiming `shape`, with valid zip CRCs
    (a CRC is no signature: a forger recomputes it)."""
    import io

    with zipfile.ZipFile(path, "w") as z:
        for name, (array, shape) in arrays.items():
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                        "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", head.getvalue() + array.tobytes())


@pytest.fixture(scope="module")
def sample_files(digits, tmp_path_factory):
    images, labels = digits
    d = tmp_path_factory.mktemp("integrity")
    np.savez(d / "ref.npz", images[:200], labels[:200])
    np.savez(d / "good.npz", images[200:400], labels[200:400])
    return d, images[200:400], labels[200:400]


def _copy(d: Path, name: str) -> Path:
    target = d / name
    target.write_bytes((d / "good.npz").read_bytes())
    return target


def _evaluate_cli(d: Path, samples: Path, clf: Path, capsys) -> tuple[int, str]:
    code = adm(["evaluate", str(d / "ref.npz"), str(samples), "--features", f"classifier:{clf}",
                "--out", str(d / "out"), "--batch-size", "64"])
    return code, capsys.readouterr().err


def test_a_flipped_byte_is_refused_not_scored(sample_files, small_classifier, capsys):
    d, images, _ = sample_files
    clf = small_classifier[1]
    assert _evaluate_cli(d, d / "good.npz", clf, capsys)[0] == 0
    for name, offset in (("first_row.npz", 5), ("last_row.npz", images.nbytes - 3)):
        bad = _copy(d, name)
        _flip(bad, images.tobytes()[:64], offset)
        with pytest.raises(zipfile.BadZipFile):  # numpy agrees that the file is corrupt
            with np.load(bad) as z:
                z["arr_0"]
        code, err = _evaluate_cli(d, bad, clf, capsys)
        assert code == 2 and "CRC-32" in err and err.startswith("adm evaluate: error: "), err
        assert len(err.strip().splitlines()) == 1


def test_compressed_members_are_checked_too(sample_files, tmp_path):
    _, images, labels = sample_files
    path = tmp_path / "c.npz"
    np.savez_compressed(path, images, labels)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # somewhere in arr_0's deflated stream
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt|CRC"):
        with NpzArray(path, "arr_0") as arr:
            for _ in arr.batches(50):
                pass


def test_a_header_claiming_more_rows_is_refused_before_reading(sample_files, capsys, small_classifier):
    d, images, labels = sample_files
    bad = d / "more_rows.npz"
    _forge(bad, {"arr_0": (images, (len(images) + 50, 32, 32, 3)), "arr_1": (labels, labels.shape)})
    with pytest.raises(ValueError, match="header declares shape"):
        NpzArray(bad, "arr_0")
    code, err = _evaluate_cli(d, bad, small_classifier[1], capsys)
    assert code == 2 and "header declares shape" in err
    _rewrite_header(_copy(d, "edited.npz"), f"({len(images)}, 32, 32, 3)", f"({len(images) + 50}, 32, 32, 3)")
    with pytest.raises(ValueError, match="header declares shape|CRC"):  # an edited header (stale CRC) too
        NpzArray(d / "edited.npz", "arr_0").read(0, 1)


def test_a_header_claiming_1e12_labels_is_refused_without_allocating(sample_files):
    d, images, labels = sample_files
    bad = d / "labels.npz"
    _forge(bad, {"arr_0": (images, images.shape), "arr_1": (labels, (10 ** 12,))})
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="header declares shape"):
            read_array(bad, "arr_1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_garbage_zip_and_negative_shapes(tmp_path):
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(ValueError, match="not an .npz"):
        npz_keys(tmp_path / "g.npz")
    _forge(tmp_path / "n.npz", {"arr_0": (np.zeros((3, 2), np.uint8), (-3, -2))})
    with pytest.raises(ValueError, match="negative dimension"):
        NpzArray(tmp_path / "n.npz", "arr_0")


def test_streaming_verify_holds_one_chunk(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)  # 786 kB
    np.savez(tmp_path / "x.npz", rows)
    with NpzArray(tmp_path / "x.npz", "arr_0") as arr:
        tracemalloc.start()
        try:
            arr.verify(chunk_bytes=32 << 10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert arr.verified and peak < 200_000
    _flip(tmp_path / "x.npz", rows.tobytes()[:64], rows.nbytes // 2)
    with NpzArray(tmp_path / "x.npz", "arr_0") as arr:
        with pytest.raises(ValueError, match="CRC-32"):
            arr.verify(chunk_bytes=32 << 10)


def test_crc_runs_of_slices_combine():
    data = os.urandom(10_000)
    assert crc32_combine(zlib.crc32(data[:3000]), zlib.crc32(data[3000:]), 7000) == zlib.crc32(data)
    runs = [(0, 4000, zlib.crc32(data[:4000])), (0, 100, zlib.crc32(data[:100])),  # an empty slice: header only
            (4000, 10_000, zlib.crc32(data[4000:]))]
    assert check_crc_runs(runs, 10_000, zlib.crc32(data), "x")
    assert not check_crc_runs(runs[:2], 10_000, zlib.crc32(data), "x")  # not covered: nothing said
    with pytest.raises(ValueError, match="CRC-32"):
        check_crc_runs(runs, 10_000, zlib.crc32(data) ^ 1, "x")


@pytest.mark.distributed
def test_two_ranks_combine_their_slices(sample_files, small_classifier, tmp_path):
    """Each rank reads half; the flipped byte sits in rank 1's half; the job refuses with one line per rank
    that gets to print (torchrun ends the other rank once the first one exits with status 2)."""
    d, images, _ = sample_files
    bad = _copy(d, "rank1.npz")
    _flip(bad, images.tobytes()[:64], images.nbytes - 100)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    runs = {}
    for name in ("good.npz", "rank1.npz"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "launch.cli", "evaluate", str(d / "ref.npz"), str(d / name),
               "--features", f"classifier:{small_classifier[1]}", "--out", str(tmp_path / name), "--batch-size", "64"]
        runs[name] = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert runs["good.npz"].returncode == 0, runs["good.npz"].stderr[-3000:]
    failed = runs["rank1.npz"]
    assert failed.returncode != 0 and not (tmp_path / "rank1.npz" / "metrics.json").exists()
    errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("adm evaluate: error: ")]
    assert 1 <= len(errors) <= 2 and all("CRC-32" in e for e in errors), failed.stderr[-3000:]
    # No traceback through our code. torchrun prints its own, from the venv, which may lie inside the checkout.
    ours = [ln for ln in failed.stderr.splitlines()
            if f'File "{ROOT}/' in ln and f'File "{ROOT}/.venv/' not in ln and "site-packages" not in ln]
    assert not ours, failed.stderr[-3000:]


def test_library_evaluate_refuses_too(sample_files, small_classifier):
    d, images, _ = sample_files
    bad = _copy(d, "lib.npz")
    _flip(bad, images.tobytes()[:64], 1000)
    with pytest.raises(ValueError, match="CRC-32"):
        evaluate(d / "ref.npz", bad, f"classifier:{small_classifier[1]}", print_fn=None, progress=False)
