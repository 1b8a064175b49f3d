"""Real jobs on the local SLURM cluster: distributed launch, `adm submit` of a training stage, and a
training job signalled mid-run that requeues and resumes to the same weights as an uninterrupted run."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm import jobs

pytestmark = pytest.mark.slurm

TRAIN = ["--preset", "tiny-unet", "--set", "total_steps=10", "save_every=2", "log_every=1", "batch_size=4",
         "num_workers=0", "keep_last=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real shards of a miniature ImageNet (MNIST digits, 4 classes)."""
    from data.miniature import make_miniature_imagenet
    from data.prepare import prepare_imagenet

    root = tmp_path_factory.mktemp("slurm-data")
    src = make_miniature_imagenet(root / "src", 4, 8, bad_files=False)
    prepare_imagenet(src, root / "shards", samples_per_shard=8, allow_custom_classes=True)
    return root / "shards"


def _job_id(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, output
    return match.group(1)


def _weights(run_dir: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    from diffusion_core.presets import Preset
    from launch.checkpointing import checkpoint_weights, read_run_config, step_dir

    preset = Preset.from_dict(read_run_config(run_dir)["preset"])
    with torch.device("meta"):
        module = preset.build()
    folder = step_dir(run_dir, step)
    return {"model": checkpoint_weights(folder, module, use_ema=False)[0],
            "ema": checkpoint_weights(folder, module, use_ema=True)[0]}


def test_two_task_job_all_reduces_through_launch_distributed(cluster, tmp_path):
    out = subprocess.run([sys.executable, "-m", "slurm.check", "--cluster", cluster, "--tasks-per-node", "2",
                          "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0/2" in out.stdout and "rank 1/2" in out.stdout and "gloo" in out.stdout
    assert "all_reduce 3 (expected 3)" in out.stdout
    job_id = _job_id(out.stdout)
    assert jobs.show_job(job_id)["JobState"] == "COMPLETED"


def test_submitted_training_completes_and_a_signalled_one_resumes_to_the_same_weights(cluster, shards, tmp_path, adm):
    # Uninterrupted: 2 tasks (gloo, CPU) through `adm submit ... --wait`.
    a = adm("submit", "train", "--run-dir", str(tmp_path / "A"), "--data", str(shards), *TRAIN,
            "--cluster", cluster, "--tasks-per-node", "2", "--log-dir", str(tmp_path / "logs-A"), "--wait", cwd=tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    job_a = _job_id(a.stdout)
    log_a = (tmp_path / "logs-A" / f"{job_a}_0_log.out").read_text()
    assert "world size 2" in log_a

    # The same run, signalled (as before a time limit / on preemption) after its first checkpoint.
    b = adm("submit", "train", "--run-dir", str(tmp_path / "B"), "--data", str(shards), *TRAIN,
            "--cluster", cluster, "--tasks-per-node", "2", "--log-dir", str(tmp_path / "logs-B"), cwd=tmp_path)
    assert b.returncode == 0, b.stdout + b.stderr
    job_b = _job_id(b.stdout)
    first = tmp_path / "B" / "checkpoints" / "step_000000002"
    deadline = time.monotonic() + 120
    while not first.is_dir():
        assert not jobs.is_finished(jobs.states([job_b])[job_b]) and time.monotonic() < deadline
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job_b], check=True)
    final = jobs.wait([job_b], poll_s=1.0, timeout_s=180)
    log_b = (tmp_path / "logs-B" / f"{job_b}_0_log.out").read_text()
    assert final[job_b] == "COMPLETED", log_b[-3000:]

    details_a, details_b = jobs.show_job(job_a), jobs.show_job(job_b)
    assert details_a["JobState"] == "COMPLETED" and details_a["Restarts"] == "0"
    assert details_b["JobState"] == "COMPLETED" and int(details_b["Restarts"]) >= 1, details_b
    assert "stopped early" in log_b and "Requeued job" in log_b, log_b[-3000:]
    train_log_b = (tmp_path / "B" / "log.txt").read_text()
    assert "resumed from" in train_log_b
    stopped_at = int(re.search(r"stopping at step (\d+)", train_log_b).group(1))
    assert 2 <= stopped_at < 10

    wa, wb = _weights(tmp_path / "A", 10), _weights(tmp_path / "B", 10)
    for kind in ("model", "ema"):
        assert wa[kind].keys() == wb[kind].keys()
        for name in wa[kind]:
            assert torch.equal(wa[kind][name], wb[kind][name]), f"{kind} {name} differs after requeue"
