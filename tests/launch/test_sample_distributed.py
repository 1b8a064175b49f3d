"""`adm sample` under torchrun with 2 gloo processes: the same file as 1 process, and kill -9 of the whole
process tree + restart; for guided DDPM and for DPM-Solver++ with a network batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion_core import presets
from launch.sample import files as sf
from runtime.distributed import free_port
from launch.model_io import save_model_file
from launch.sample.job import sample
from launch.sample.options import SampleOptions

pytestmark = pytest.mark.distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, SHARD, STEPS, BATCH = 16, 2, "4", 2


def _model_files(root):
    paths = []
    for name, seed in (("tiny-unet", 21), ("tiny-classifier", 22)):
        preset = presets.get(name)
        module = preset.build()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # fresh ADM nets output exactly 0; perturb so every layer matters
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        paths.append(str(save_model_file(root / f"{name}.pt", module.state_dict(), preset)))
    return paths


# The sampler's own options: steps and the rest, as flags and as SampleOptions fields.
SAMPLERS = {
    "ddpm": (STEPS, [], {}),
    "dpm++": ("dpm++2m-4", ["--network-batch", "1", "--thresholding", "--skip-type", "logSNR"],
              {"network_batch": 1, "thresholding": True, "skip_type": "logSNR"}),
}


def _args(unet, clf, out, sampler="ddpm"):
    steps, extra, _ = SAMPLERS[sampler]
    return ["--model", unet, "--classifier", clf, "--classifier-scale", "4", "--num-samples", str(N),
            "--batch-size", str(BATCH), "--steps", steps, "--shard-size", str(SHARD), "--out", str(out),
            "--no-progress", *extra]


def _torchrun(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launch.cli", "sample", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ranks(args):
    """Two ranks started directly with RANK/WORLD_SIZE/MASTER_* (as srun would), in one process group
    of their own, so that one kill -9 of the group reaches the whole tree that samples at once
    (torchrun puts its workers in sessions of their own)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        group = {"process_group": procs[0].pid if procs else 0}
        procs.append(subprocess.Popen([sys.executable, "-m", "launch.cli", "sample", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **group))
    return procs


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _arrays(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_two_processes_equal_one_and_a_killed_run_resumes(tmp_path, sampler):
    unet, clf = _model_files(tmp_path)
    name = sf.samples_file_name(N, (16, 16, 3))
    steps, _, fields = SAMPLERS[sampler]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = sample(SampleOptions(model=unet, classifier=clf, classifier_scale=4.0, num_samples=N, batch_size=BATCH,
                                   steps=steps, shard_size=SHARD, out=str(tmp_path / "one"), progress=False,
                                   **fields))
    finally:
        torch.set_num_threads(before)
    ref_images, ref_labels = _arrays(one)

    # Two processes, uninterrupted.
    _finish(_torchrun(_args(unet, clf, tmp_path / "two", sampler)))
    images, labels = _arrays(tmp_path / "two" / name)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)

    # Two processes, killed together with SIGKILL (their process group) once the first shard is on
    # disk, then restarted.
    out = tmp_path / "killed"
    procs = _ranks(_args(unet, clf, out, sampler))
    deadline = time.monotonic() + 120
    while not sf.list_shard_files(out) and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = all(p.poll() is None for p in procs)
    os.killpg(procs[0].pid, signal.SIGKILL)
    logs = "\n".join(p.communicate()[0] for p in procs)
    done = len(sf.list_shard_files(out))
    assert alive and 0 < done < N // SHARD, f"the kill should land mid-way, found {done} shards:\n{logs}"
    assert not (out / name).exists()
    log = "\n".join(_finish(p) for p in _ranks(_args(unet, clf, out, sampler)))
    assert f"{done} of {N // SHARD} shards already done" in log, log
    images, labels = _arrays(out / name)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert not (out / "shards").exists()
