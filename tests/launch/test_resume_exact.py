"""Exact resume in one process, in the configuration users run: loader workers, dropout 0.1, kill -9.

A run killed (the whole process tree, loader workers included) after a checkpoint and rerun with
the same command must log the same scalars and end with the same checkpoint, bit for bit, as the
uninterrupted run: the diffusion model (`adm train`) and the noisy classifier (`adm train-classifier`,
random crops, validation shards). The 2-process DDP, FSDP2 and DeepSpeed cases are in
test_train_distributed.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.launch.resume_check import assert_same_run, kill_after_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = ["--set", f"total_steps={STEPS}", "log_every=1", "save_every=2", "keep_last=10", "num_workers=2",
          "deterministic=true", "model.dropout=0.1", "progress=false", "batch_size=4"]
JOBS = {
    "train": ["sample_every=3", "sample_steps=2", "sample_count=2"],
    "train-classifier": ["eval_every=3", "eval_batches=2", "random_flip=true"],
}


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from tests.launch.test_train_data import digit_shards

    tmp = tmp_path_factory.mktemp("resume_exact")
    return tmp, digit_shards(tmp / "train", per_class=6, samples_per_shard=10), \
        digit_shards(tmp / "val", split="val", per_class=2, samples_per_shard=10)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_kill9_after_a_checkpoint_resumes_bitwise(digits, job):
    import subprocess

    tmp, train, val = digits
    extra = ["--val-data", str(val)] if job == "train-classifier" else []

    def cmd(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "launch.cli", job, "--run-dir", str(run_dir), "--data", str(train), *extra,
                *COMMON, *JOBS[job]]

    reference, resumed = tmp / f"{job}-reference", tmp / f"{job}-resumed"
    done = subprocess.run(cmd(reference), cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_after_checkpoint(cmd(resumed), resumed, 2, cwd=ROOT, env=_env(tmp))
    assert not (resumed / "checkpoints" / f"step_{STEPS:09d}").exists()
    rerun = subprocess.run(cmd(resumed), cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in (resumed / "log.txt").read_text()
    assert_same_run(reference, resumed, STEPS)
