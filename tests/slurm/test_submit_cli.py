"""`adm submit` without a cluster: option splitting, validation by the stage's own parser, --dry-run."""
from __future__ import annotations

import pytest

from slurm.commands.submit import split_submit_options


def test_submit_options_are_separated_from_the_stage_options_in_order():
    mine, stage = split_submit_options(
        ["--run-dir", "r", "--cluster", "local", "--set", "a=1", "--nodes=2", "--wait", "--", "--nodes", "x"])
    assert mine == ["--cluster", "local", "--nodes=2", "--wait"]
    assert stage == ["--run-dir", "r", "--set", "a=1", "--nodes", "x"]


def test_dry_run_prints_the_job_script(tmp_path, adm):
    out = adm("submit", "train", "--run-dir", "runs/x", "--preset", "tiny-unet", "--cluster", "local",
              "--tasks-per-node", "2", "--time", "30", "--after", "12,13", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1", "#SBATCH --requeue", "#SBATCH --signal=USR2@30",
                 "#SBATCH --time=30", "#SBATCH --partition=debug", "#SBATCH --dependency=afterok:12:13",
                 "#SBATCH --kill-on-invalid-dep=yes", "export MASTER_ADDR=", "export MASTER_PORT=",
                 "export OMP_NUM_THREADS=1", "srun"):
        assert line in script, line
    assert "adm train --run-dir runs/x --preset tiny-unet" in script
    gpus = adm("submit", "train", "--run-dir", "r", "--cluster", "example-a100", "--nodes", "4", "--dry-run", cwd=tmp_path)
    assert "#SBATCH --gpus-per-node=8" in gpus.stdout and "#SBATCH --ntasks-per-node=8" in gpus.stdout
    assert "#SBATCH --nodes=4" in gpus.stdout and "#SBATCH --exclusive" in gpus.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--run-dir", "r", "--no-such-flag", "--cluster", "local"], "unrecognized arguments: --no-such-flag"),
    (["train", "--run-dir", "r", "--cluster", "nowhere"], "unknown cluster profile 'nowhere'"),
    (["no-such-stage", "--cluster", "local"], "unknown stage 'no-such-stage'"),
    (["train", "--run-dir", "r"], "--cluster is required"),
    (["train", "--run-dir", "r", "--cluster", "example-a100", "--tasks-per-node", "2"], "one task per GPU"),
])
def test_bad_input_is_refused_before_submitting(tmp_path, adm, args, message):
    out = adm("submit", *args, "--dry-run", cwd=tmp_path, env={"ADM_CLUSTER": ""})
    assert out.returncode == 2 and message in out.stderr, out.stderr
