"""kill -9 of `adm prepare-imagenet` mid-way, then a rerun: byte-identical to an uninterrupted run."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data.miniature import make_miniature_imagenet
from data.prepare import prepare_imagenet

from .conftest import tree_digest

ADM = [sys.executable, "-m", "launch.cli", "prepare-imagenet"]


def _wait_until_unlocked(lock: Path, timeout: float = 20.0) -> None:
    """SIGKILL is delivered at once but processes exit asynchronously; the job's lock goes with the last one."""
    deadline = time.monotonic() + timeout
    with open(lock, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed job's processes still hold its lock"
                time.sleep(0.01)


def test_kill_9_then_rerun_gives_identical_shards(tmp_path):
    src = make_miniature_imagenet(tmp_path / "src", num_classes=8, per_class=5, layout="train-tar")
    reference = tmp_path / "reference"
    ref_manifest = prepare_imagenet(src, reference, samples_per_shard=1)
    total = len(ref_manifest["shards"])
    assert total > 40

    out = tmp_path / "out"
    args = [str(src), str(out), "--samples-per-shard", "1", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(ADM + args, cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(out.glob("train-*.tar")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard appeared within 60 s"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as a node failure would
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    written = len(list(out.glob("train-*.tar")))
    assert not (out / "manifest.json").exists() and written < total, "the job finished before it was killed"

    _wait_until_unlocked(out / ".prepare" / "lock")
    prepare_imagenet(src, out, samples_per_shard=1, workers=2)
    assert tree_digest(out) == tree_digest(reference)
