"""No host synchronisation in a steady-state training step, for every strategy and precision.

`bench/host_syncs.py` runs the real trainer (digit shards, one loader worker, EMA, the chosen
strategy and precision) and counts the operations that make the host wait for the device
(`.item()`, `int(t)`, `bool(t)`, `nonzero`, ...: runtime.host_sync.HostSyncCounter) over the first
N and the first 2N steady-state steps. Zero per step means both counts are 0. On this CPU-only
machine this is the count a GPU step would make through dispatched ops; the GPU check
(`--sync-debug error`, marked gpu) also sees undispatched syncs.

The per-step preemption poll is replaced by the local flag here (`--preemption-poll local`):
issue 12 turns it into a flag agreed every N steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.distributed import free_port
from runtime.host_sync import HostSyncCounter

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "host_syncs.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.launch.test_train_data import digit_shards

    return digit_shards(tmp_path_factory.mktemp("syncs") / "digits", per_class=12, samples_per_shard=10)


def _count(tmp: Path, shards: Path, *args: str, nproc: int = 1) -> dict:
    out = tmp / f"report-{len(list(tmp.glob('report-*')))}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}"]
    cmd = [*launcher, str(SCRIPT), "--data", str(shards), "--work", str(tmp), "--out", str(out),
           "--warmup", "3", "--steps", "3", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy,precision,nproc", [
    ("ddp", "fp32", 1), ("ddp", "fp16", 1), ("ddp", "bf16", 1),
    ("ddp", "fp32", 2), ("fsdp", "fp32", 2), ("fsdp", "fp16", 1),
])
def test_torch_strategies_make_no_host_sync_per_step(tmp_path, shards, strategy, precision, nproc):
    report = _count(tmp_path, shards, "--strategy", strategy, "--precision", precision, nproc=nproc)
    assert report["world_size"] == nproc
    assert report["syncs_first_N_steps"] == report["syncs_2N_steps"] == 0, report["steady_state_locations"]


def test_classifier_training_makes_no_host_sync_per_step(tmp_path, shards):
    report = _count(tmp_path, shards, "--kind", "classifier")
    assert report["syncs_first_N_steps"] == report["syncs_2N_steps"] == 0, report["steady_state_locations"]


def test_deepspeed_adds_no_sync_of_ours(tmp_path, shards):
    """ZeRO-2: the trainer adds none. DeepSpeed itself reads its overflow flag and checks its norm
    on the host (1 read per step in fp32, 2 in bf16); with bf16.check_grad_overflow=false it reads none."""
    fp32 = _count(tmp_path, shards, "--strategy", "deepspeed", "--precision", "fp32")
    # Locations in installed packages are named from the package on, whichever folder holds the venv.
    where = {k.rpartition("site-packages/")[2]: v for k, v in fp32["steady_state_locations"].items()}
    assert where == {"deepspeed/runtime/utils.py:233 (is_invalid_grad_norm) [aten::_local_scalar_dense]": 2 * fp32["N"]}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"bf16": {"check_grad_overflow": False}}))
    bf16 = _count(tmp_path, shards, "--strategy", "deepspeed", "--precision", "bf16", "--set",
                  f"deepspeed_config={user}")
    assert bf16["syncs_first_N_steps"] == bf16["syncs_2N_steps"] == 0, bf16["steady_state_locations"]


def test_one_added_item_per_step_is_counted(tmp_path, shards):
    """The check is not vacuous: one `.item()` more per step gives N and 2N."""
    report = _count(tmp_path, shards, "--inject-sync")
    assert (report["syncs_first_N_steps"], report["syncs_2N_steps"]) == (report["N"], 2 * report["N"])
    [where] = report["steady_state_locations"]
    assert where.startswith("bench/host_syncs.py:") and "(train_step) [aten::_local_scalar_dense]" in where


def test_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with HostSyncCounter() as counter:
        x.sum().item()
        int(x[0])
        bool(x[1] > 0)
        x[x > 2]                       # boolean mask -> nonzero
        torch.nonzero(x)
        torch.equal(x, x)
        torch._assert_async(torch.tensor(True))  # asynchronous on a GPU: not a sync
        x * 2
    ops = [e.op for e in counter.events]
    assert ops == ["aten::_local_scalar_dense"] * 3 + ["aten::index", "aten::nonzero", "aten::equal"]
    assert all("test_host_syncs.py" in e.where for e in counter.events)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_step_under_sync_debug_mode_error(tmp_path, shards):
    report = _count(tmp_path, shards, "--precision", "bf16", "--sync-debug", "error")
    assert report["syncs_2N_steps"] == 0 and report["sync_debug"] == "error"
