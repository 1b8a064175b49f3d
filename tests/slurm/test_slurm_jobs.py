"""Real jobs on the local SLURM cluster: distributed launch, `adm submit` of a training stage, and a
training job signalled mid-run that requeues and resumes to the same weights as an uninterrupted run."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import jobs

pytestmark = pytest.mark.slurm


def job_id_of(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, output
    return match.group(1)


def wait_for_dir(folder: Path, job_id: str, timeout_s: float = 120) -> None:
    """Poll until `folder` exists while the job is still running (fail fast if it ended)."""
    deadline = time.monotonic() + timeout_s
    while not folder.is_dir():
        state = jobs.states([job_id])[job_id]
        assert not jobs.is_finished(state), f"job {job_id} ended {state} before {folder} appeared"
        assert time.monotonic() < deadline, f"{folder} did not appear in {timeout_s}s"
        time.sleep(0.1)


def test_two_task_job_all_reduces_through_launch_distributed(cluster, tmp_path):
    out = subprocess.run([sys.executable, "-m", "slurm.check", "--cluster", cluster, "--tasks-per-node", "2",
                          "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0/2" in out.stdout and "rank 1/2" in out.stdout and "gloo" in out.stdout
    assert "all_reduce 3 (expected 3)" in out.stdout
    assert jobs.show_job(job_id_of(out.stdout))["JobState"] == "COMPLETED"


def test_adm_submit_runs_a_two_task_training_job_to_completion(uninterrupted_run):
    result = uninterrupted_run["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)
    details = jobs.show_job(job_id)
    assert details["JobState"] == "COMPLETED" and details["Restarts"] == "0" and details["NumTasks"] == "2"
    log = (uninterrupted_run["log_dir"] / f"{job_id}_0_log.out").read_text()
    assert "world size 2" in log and "rendezvous at" in log
    assert (uninterrupted_run["run_dir"] / "checkpoints" / "step_000000008").is_dir()


def test_signalled_training_requeues_and_resumes_to_the_same_weights(cluster, shards, tmp_path, adm, train_args,
                                                                      uninterrupted_run, same_weights):
    submitted = adm("submit", "train", "--run-dir", str(tmp_path / "run"), "--data", str(shards), *train_args,
                    "--cluster", cluster, "--tasks-per-node", "2", "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    # What SLURM sends before a time limit (--signal) and `scancel --signal` sends on preemption.
    wait_for_dir(tmp_path / "run" / "checkpoints" / "step_000000002", job_id)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    final = jobs.wait([job_id], poll_s=1.0, timeout_s=180)
    log = (tmp_path / "logs" / f"{job_id}_0_log.out").read_text()
    assert final[job_id] == "COMPLETED", log[-3000:]
    assert int(jobs.show_job(job_id)["Restarts"]) >= 1
    # submitit logs "Requeued job" only after `scontrol requeue` returns, and the requeue itself may kill the
    # task first; the restart count above is SLURM's own record that the job was requeued.
    assert "stopped early" in log and "Calling checkpoint method" in log, log[-3000:]
    train_log = (tmp_path / "run" / "log.txt").read_text()
    stopped_at = int(re.search(r"stopping at step (\d+)", train_log).group(1))
    assert 2 <= stopped_at < 8 and f"(step {stopped_at})" in train_log  # resumed from that checkpoint
    same_weights(uninterrupted_run["run_dir"], tmp_path / "run")


def test_requeue_check_of_a_stage_that_never_polls(cluster, tmp_path):
    """python -m slurm.check --requeue: a job that only writes periodic checkpoints is requeued at once."""
    from slurm import check, profiles

    profile = profiles.load_profile(cluster)
    report = check.requeue_check(profile, profile.resources, tmp_path, steps=16, step_s=0.2, save_every=4,
                                 poll=False, signal_name="USR2")
    assert report["state"] == "COMPLETED" and report["restarts"] >= 1
    assert report["starts"][0] == 0 and report["starts"][-1] >= 4  # resumed from a periodic checkpoint
    assert report["digest"] == check.chain_digest(16)


SHORT_LIMIT = """\
description: the local cluster with a two-minute time limit, so that SLURM itself signals the job
partition: debug
nodes: 1
gpus_per_node: 0
tasks_per_node: 1
cpus_per_task: 1
time_min: 2
signal_delay_s: 100
max_requeues: 20
env:
  OMP_NUM_THREADS: "1"
"""


def submit_against_the_limit(adm, shards, root: Path, steps: int) -> tuple[str, dict, str, str]:
    """`adm submit train` of `steps` tiny-unet steps (loader workers, dropout) under the two-minute profile;
    waits for it: (job id, its final state, rank 0's task log, log.txt)."""
    root.mkdir(parents=True)
    profile = root / "two-minutes.yaml"
    profile.write_text(SHORT_LIMIT)
    submitted = adm("submit", "train", "--run-dir", str(root / "run"), "--data", str(shards), "--preset", "tiny-unet",
                    "--set", f"total_steps={steps}", "save_every=100000", "log_every=10", "batch_size=32",
                    "model.model_channels=64", "num_workers=2", "model.dropout=0.1", "keep_last=2", "progress=false",
                    "--cluster", str(profile), "--tasks-per-node", "2", "--log-dir", str(root / "logs"), cwd=root)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    assert "--signal=USR2@100" in next((root / "logs").glob("*_submission.sh")).read_text()
    final = jobs.wait([job_id], poll_s=2.0, timeout_s=3600)
    log = (root / "logs" / f"{job_id}_0_log.out").read_text()
    train_log = (root / "run" / "log.txt").read_text()
    assert final[job_id] == "COMPLETED", log[-4000:] + train_log[-2000:]
    return job_id, jobs.show_job(job_id), log, train_log


def test_time_limit_signal_requeues_with_progress_until_the_training_is_done(cluster, shards, tmp_path, adm):
    """A real `--time 2` limit: SLURM's own signal (`--signal USR2@100`, sent by the controller on its
    30-second tick, so often while the trainer still starts up) requeues the job again and again;
    every run checkpoints progress before it is requeued (within the profile's grace, 70 s), and the
    job ends COMPLETED with all its steps.

    How many steps fit in one allocation depends on the machine's speed (about 150-250 on two idle
    cores, 15 on a loaded one): 150 steps first, and when those fit in one allocation (no requeue to
    look at), the same with three times the steps."""
    steps = 150
    job_id, details, log, train_log = submit_against_the_limit(adm, shards, tmp_path / "first", steps)
    if int(details["Restarts"]) == 0:
        steps *= 3
        job_id, details, log, train_log = submit_against_the_limit(adm, shards, tmp_path / "longer", steps)
        root = tmp_path / "longer"
    else:
        root = tmp_path / "first"
    restarts = int(details["Restarts"])
    assert restarts >= 1, train_log
    assert "SIGUSR2: checkpoint and requeue" in log  # SLURM's own time-limit signal, not one sent by hand
    assert "did not checkpoint and stop" not in log, log  # never requeued without progress
    # Every run resumed where the previous one stopped, and every run made progress.
    stops = [int(s) for s in re.findall(r"stopping at step (\d+) after a stop signal \(SIGUSR2\)", train_log)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", train_log)]
    assert len(stops) == len(resumes) == restarts, train_log
    assert resumes == stops and all(b > a for a, b in zip([0, *stops], stops)), train_log
    assert (root / "run" / "checkpoints" / f"step_{steps:09d}").is_dir()
    assert f"step {steps} | loss" in train_log
