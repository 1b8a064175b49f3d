"""The plain sbatch templates: stage.sbatch (srun + torchrun, requeue before the time limit) on the
local cluster, and pipeline.sh's dependency chain."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import jobs

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm" / "templates"


@pytest.mark.slurm
def test_stage_template_runs_torchrun_and_requeues_to_the_same_weights(cluster, shards, tmp_path, train_args,
                                                                        uninterrupted_run, same_weights):
    env = dict(os.environ, ADM_NPROC_PER_NODE="2", ADM_PYTHON=sys.executable)
    # The template asks for 8 GPUs and 64 CPUs; the local cluster has neither, so override them.
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10", "--job-name=tmpl",
         f"--output={tmp_path}/%x-%j.out", str(TEMPLATES / "stage.sbatch"),
         "train", "--run-dir", str(tmp_path / "run"), "--data", str(shards), *train_args],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    first = tmp_path / "run" / "checkpoints" / "step_000000002"
    deadline = time.monotonic() + 120
    while not first.is_dir():
        assert not jobs.is_finished(jobs.states([job_id])[job_id]) and time.monotonic() < deadline
        time.sleep(0.1)
    # What --signal=B:USR1@300 does five minutes before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    final = jobs.wait([job_id], poll_s=1.0, timeout_s=180)
    log = (tmp_path / f"tmpl-{job_id}.out").read_text()
    assert final[job_id] == "COMPLETED", log[-3000:]
    assert int(jobs.show_job(job_id)["Restarts"]) >= 1
    assert "requeued job" in log and "world size 2" in log and "stage ended with status 0" in log
    train_log = (tmp_path / "run" / "log.txt").read_text()
    stopped_at = int(re.search(r"stopping at step (\d+)", train_log).group(1))
    assert f"(step {stopped_at})" in train_log  # the checkpoint written on the signal is where it resumed
    same_weights(uninterrupted_run["run_dir"], tmp_path / "run")


def test_pipeline_template_chains_every_stage_with_afterok(tmp_path):
    # The real thing needs GPUs and ImageNet: record what it would submit with a stand-in sbatch.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\nn=$(( $(wc -l < {record} 2>/dev/null || echo 0) + 101 ))\n'
                    f'echo "$n $*" >> {record}\necho $n\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", IMAGENET="/d/train.tar", IMAGENET_VAL="/d/val",
               VAL_LABELS="/d/labels.csv", INCEPTION="/m/inception.pth", OUT=str(tmp_path / "out"),
               SBATCH_OPTS="--partition=gpu")
    out = subprocess.run(["bash", str(TEMPLATES / "pipeline.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calls = {}
    for line in record.read_text().splitlines():
        job, args = line.split(" ", 1)
        name = re.search(r"--job-name=adm128\.(\S+)", args).group(1)
        after = re.search(r"--dependency=afterok:(\S+)", args)
        calls[name] = {"id": job, "after": set(after.group(1).split(":")) if after else set(), "args": args}
        assert "--partition=gpu" in args and "--kill-on-invalid-dep=yes" in args and "stage.sbatch" in args
    ids = {name: c["id"] for name, c in calls.items()}
    assert len(calls) == 2 + 1 + 2 + 5 + 5 + 1
    assert calls["prepare"]["after"] == set() and calls["train"]["after"] == {ids["prepare"]}
    assert calls["train_classifier"]["after"] == {ids["prepare"], ids["prepare_val"]}
    for scale in ("0.0", "0.5", "1.0", "2.0", "4.0"):
        assert calls[f"sample.scale-{scale}"]["after"] == {ids["train"], ids["train_classifier"]}
        assert calls[f"evaluate.scale-{scale}"]["after"] == {ids[f"sample.scale-{scale}"], ids["reference"]}
        assert f"--classifier-scale {scale}" in calls[f"sample.scale-{scale}"]["args"]
    assert calls["report"]["after"] == {ids[f"evaluate.scale-{s}"] for s in ("0.0", "0.5", "1.0", "2.0", "4.0")}
    assert "--nodes=4" in calls["train"]["args"]
