"""`adm train` in real processes: torchrun with 2 CPU ranks (gloo) on the tiny UNet and real digit shards,
in the configuration users run: 2 loader workers per rank, dropout 0.1.

One uninterrupted run per strategy is the reference. FSDP2 and DeepSpeed ZeRO-3 must reproduce the
DDP losses; DDP runs interrupted every way a job dies (kill -9 of the whole tree while a checkpoint is
being written, SIGTERM preemption, kill -9 after a checkpoint), and FSDP2 and DeepSpeed ZeRO-2 runs
killed after a checkpoint, rerun with the same command, must log every scalar and end with every
checkpoint value (model, optimizer, EMA, RNG, data position) bit for bit as their reference;
checkpoints written by 2 ranks resume on 1 (resharded through DCP), except DeepSpeed's, which say
why not.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.distributed import free_port
from tests.launch.resume_check import (assert_same_run, complete, kill_after_checkpoint, kill_during_checkpoint,
                                       kill_tree, wait_for)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
# dropout > 0 so that the per-rank torch RNG must be restored too; loader workers as users run them.
COMMON = ["--set", f"total_steps={STEPS}", "log_every=1", "save_every=2", "keep_last=10", "num_workers=2",
          "deterministic=true", "model.dropout=0.1", "sample_every=4", "sample_steps=3", "sample_count=4",
          "progress=false"]
STRATEGY_ARGS = {"ddp": [], "fsdp": ["--strategy", "fsdp"],
                 "deepspeed-z2": ["--strategy", "deepspeed", "--set", "zero_stage=2"],
                 "deepspeed-z3": ["--strategy", "deepspeed", "--set", "zero_stage=3"]}
TB_TAGS = ["train/loss", "train/mse", "train/vb", "train/loss_q0", "train/mse_q3", "train/grad_norm", "train/lr",
           "train/loss_scale", "train/images_per_s", "train/mfu", "train/peak_memory_gb"]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))  # a killed JIT build must not block others
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(run_dir: Path, data: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "launch.cli", "train", "--run-dir", str(run_dir),
            "--data", str(data), *COMMON, *extra]


def _run(cmd: list[str], tmp: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=timeout)


def _losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _ema(run_dir: Path) -> dict[str, torch.Tensor]:
    from launch.train.export import export_run

    out = export_run(run_dir, run_dir / "exported")
    return torch.load(out["openai"], weights_only=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.launch.test_train_data import digit_shards

    tmp = tmp_path_factory.mktemp("train_dist")
    return tmp, digit_shards(tmp / "digits", per_class=12, samples_per_shard=10)


@pytest.fixture(scope="module")
def references(work):
    """`references(name)`: the uninterrupted 2-process run of STRATEGY_ARGS[name], run once per module."""
    tmp, data = work
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            run_dir = tmp / name
            result = _run(_torchrun(run_dir, data, *STRATEGY_ARGS[name]), tmp)
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = run_dir
        return done[name]
    return get


@pytest.fixture(scope="module")
def reference(references):
    """The uninterrupted DDP run."""
    return references("ddp")


def test_ddp_run_directory_tensorboard_and_log(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (reference / "config.json").is_file() and (reference / "log.txt").is_file()
    steps = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert steps == [f"step_{s:09d}" for s in range(2, STEPS + 1, 2)]
    last = reference / "checkpoints" / f"step_{STEPS:09d}"
    assert {p.name for p in last.iterdir()} == {"meta.json", "trainer.pt", "rank_00000.pt", "rank_00001.pt", "state"}
    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert set(TB_TAGS) <= set(tags["scalars"]), sorted(tags["scalars"])
    assert "samples/ema" in tags["images"]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    mfu = acc.Scalars("train/mfu")[-1].value
    assert 0 < mfu <= 1.0 and acc.Scalars("train/images_per_s")[-1].value > 0
    assert {"perf/peak_tflops", "perf/measured_matmul_tflops", "perf/gflop_per_image"} <= set(tags["scalars"])
    log = (reference / "log.txt").read_text()
    assert "GFLOP per training image" in log and f"step {STEPS} | loss" in log


def test_fsdp_and_deepspeed_reproduce_the_ddp_losses(reference, references):
    expected = _losses(reference)
    # ZeRO-3: the DeepSpeed stage that partitions parameters (and so the EMA) too.
    for name in ("fsdp", "deepspeed-z3"):
        got = _losses(references(name))
        for step in (1, 2, 3):
            assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (name, step)
        for step in range(4, STEPS + 1):
            assert got[step] == pytest.approx(expected[step], rel=1e-3), (name, step)
    # Sharded EMA (FSDP) and DeepSpeed's checkpoints export to the same weights as DDP's.
    ref = _ema(reference)
    for name in ("fsdp", "deepspeed-z3"):
        other = _ema(references(name))
        assert other.keys() == ref.keys()
        assert max((other[k] - ref[k]).abs().max().item() for k in ref) < 1e-4


def test_ddp_killed_in_a_checkpoint_write_preempted_and_killed_resumes_bitwise(reference, work):
    tmp, data = work
    run_dir = tmp / "interrupted"
    cmd = _torchrun(run_dir, data)
    popen = dict(cwd=ROOT, env=_env(tmp))
    # 1. kill -9 of the whole tree while a checkpoint is being written: the partial folder is never used.
    cut = kill_during_checkpoint(cmd, run_dir, (4, 6), **popen)
    assert not complete(run_dir, cut) and (run_dir / "checkpoints" / f".tmp-step_{cut:09d}").is_dir()
    # 2. Rerun; SIGTERM (what SLURM and torchrun send on preemption) once it trained past the resume point.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        wait_for(lambda: f"step {cut - 1} | loss" in (run_dir / "log.txt").read_text().partition("resumed from")[2], proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode != 0
    log = (run_dir / "log.txt").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{cut - 2:09d}'}" in log
    assert not (run_dir / "checkpoints" / f".tmp-step_{cut:09d}").exists()  # cleaned on resume
    assert "after a stop signal (SIGTERM); checkpoint written" in log, out[-2000:]
    stopped = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert cut - 1 <= stopped <= STEPS - 3, log
    # 3. Rerun; kill -9 of the whole tree once it logged a step past its next checkpoint.
    following = stopped + 2 - stopped % 2
    kill_after_checkpoint(cmd, run_dir, following, **popen)
    assert not complete(run_dir, STEPS)
    # 4. Rerun again: resume from the latest complete checkpoint and finish.
    result = _run(cmd, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "log.txt").read_text().count("resumed from") == 3
    assert_same_run(reference, run_dir, STEPS)


@pytest.mark.parametrize("name", ["fsdp", "deepspeed-z2"])
def test_sharded_kill9_after_a_checkpoint_resumes_bitwise(references, work, name):
    tmp, data = work
    reference = references(name)
    run_dir = tmp / f"{name}-interrupted"
    cmd = _torchrun(run_dir, data, *STRATEGY_ARGS[name])
    kill_after_checkpoint(cmd, run_dir, 4, cwd=ROOT, env=_env(tmp))
    assert not complete(run_dir, STEPS)
    result = _run(cmd, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in (run_dir / "log.txt").read_text()
    assert_same_run(reference, run_dir, STEPS)


def test_world_size_change_reshards_ddp_fsdp_but_not_deepspeed(reference, references, work):
    tmp, data = work
    # DDP (2 ranks) -> FSDP on 1 process: DCP reshards model, optimizer and EMA.
    moved = tmp / "one_rank"
    shutil.copytree(reference, moved)
    cmd = [sys.executable, "-m", "launch.cli", "train", "--run-dir", str(moved), "--data", str(data), *COMMON,
           f"total_steps={STEPS + 2}", "--strategy", "fsdp"]
    result = _run(cmd, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (moved / "log.txt").read_text()
    assert "world size changed (2 -> 1)" in log and f"step {STEPS + 2} | loss" in log
    assert sorted(_losses(moved)) == list(range(1, STEPS + 3))
    # DeepSpeed's ZeRO partitions cannot be resharded: a clear error, nothing written.
    ds = references("deepspeed-z3")
    before = sorted(str(p.relative_to(ds)) for p in ds.rglob("*")), (ds / "config.json").read_text()
    cmd = [sys.executable, "-m", "launch.cli", "train", "--run-dir", str(ds), "--data", str(data), *COMMON,
           f"total_steps={STEPS + 2}", *STRATEGY_ARGS["deepspeed-z3"]]
    result = _run(cmd, tmp)
    assert result.returncode == 2
    assert "written by 2 DeepSpeed processes but this run has 1" in result.stderr
    assert (sorted(str(p.relative_to(ds)) for p in ds.rglob("*")), (ds / "config.json").read_text()) == before
