"""Run folders and model files from someone else: a crafted pickle anywhere must not run code.

Each attack file, if unpickled the ordinary way, creates a marker file (checked once with plain
pickle / torch.load so the test knows its bait works); every project entry point must refuse it with
one line naming the file and leave no marker. Runs are real (`adm train` on real digit shards),
including DeepSpeed ZeRO-2 whose own checkpoint files DeepSpeed loads with weights_only=False.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.safe_load import RefusedFile, dcp_load, load_torch_file, read_dcp_metadata
from tests.launch.test_train_data import digit_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


class Bait:
    """Unpickling this runs `touch MARKER` (what an attacker's file would do, minus the harm)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def adm(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=600)


def assert_refused(result: subprocess.CompletedProcess, command: str, names: str, marker: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if "WARNING" not in ln and ln.strip()]
    assert lines and lines[-1].startswith(f"adm {command}: error: ") and names in lines[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not marker.exists(), "the crafted pickle ran"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("untrusted")
    data = digit_shards(tmp / "digits", per_class=2, samples_per_shard=10)
    settings = ["total_steps=2", "save_every=2", "num_workers=0", "progress=false", "sample_every=0"]
    for name, strategy, extra in (("ddp", "ddp", []), ("deepspeed", "deepspeed", ["zero_stage=2"])):
        result = adm(tmp, "train", "--run-dir", str(tmp / name), "--data", str(data), "--strategy", strategy,
                     "--set", *settings, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return tmp, data


def _copy(tmp: Path, name: str, new: str) -> Path:
    dst = tmp / new
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tmp / name, dst)
    return dst


def _metadata(run: Path) -> Path:
    return run / "checkpoints" / "step_000000002" / "state" / ".metadata"


def test_the_bait_works_with_plain_pickle(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Bait(marker)))
    assert marker.exists()


def test_crafted_dcp_metadata_runs_nothing_in_export_sample_init_and_resume(work):
    tmp, data = work
    marker = tmp / "MARKER-dcp"
    run = _copy(tmp, "ddp", "evil-dcp")
    _metadata(run).write_bytes(pickle.dumps(Bait(marker)))
    names = str(_metadata(run))
    assert_refused(adm(tmp, "export", str(run), "--out", str(tmp / "exp")), "export", names, marker)
    assert_refused(adm(tmp, "sample", "--model", str(run), "--out", str(tmp / "s"), "--num-samples", "2",
                       "--steps", "2", "--device", "cpu"), "sample", names, marker)
    assert_refused(adm(tmp, "train", "--run-dir", str(tmp / "fresh"), "--data", str(data), "--init-from", str(run),
                       "--set", "total_steps=1", "num_workers=0"), "train", names, marker)
    assert_refused(adm(tmp, "train", "--run-dir", str(run), "--data", str(data), "--set", "total_steps=4",
                       "save_every=2", "num_workers=0", "sample_every=0"), "train", names, marker)


def test_dcp_metadata_must_name_files_inside_the_checkpoint(work):
    tmp, _ = work
    run = _copy(tmp, "ddp", "escape-dcp")
    path = _metadata(run)
    metadata = read_dcp_metadata(path)  # the genuine file passes
    entry = next(iter(metadata.storage_data.values()))
    for bad in ("../../config.json", "/etc/passwd"):
        entry.relative_path = bad
        path.write_bytes(pickle.dumps(metadata))
        with pytest.raises(RefusedFile, match="not a file of this checkpoint folder"):
            read_dcp_metadata(path)
    entry.relative_path, entry.length = "__0_0.distcp", 1 << 40
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(RefusedFile, match="lies outside"):
        read_dcp_metadata(path)


def test_dcp_non_tensor_items_are_loaded_weights_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    dcp.save({"w": torch.ones(3), "extra": Bait(marker)}, checkpoint_id=str(tmp_path / "state"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(RefusedFile, match="refused to load a data file"):
        dcp_load({"w": torch.empty(3), "extra": 0}, tmp_path / "state", no_dist=True)
    assert not marker.exists()
    target = {"w": torch.empty(3)}
    dcp_load(target, tmp_path / "state", no_dist=True)  # the plain items of the same folder still load
    assert torch.equal(target["w"], torch.ones(3))
    dcp.load({"w": torch.empty(3), "extra": 0}, checkpoint_id=str(tmp_path / "state"), no_dist=True)
    assert marker.exists(), "torch's own reader runs it: the bait is real"


def _poison_deepspeed(run: Path, marker: Path) -> Path:
    path = next((run / "checkpoints" / "step_000000002" / "deepspeed" / "ds").glob("*optim_states.pt"))
    state = torch.load(path, weights_only=False)
    state["optimizer_state_dict"]["zero_stage"] = Bait(marker)
    torch.save(state, path)
    return path


def test_crafted_deepspeed_files_are_refused_on_resume_and_export(work):
    tmp, data = work
    marker = tmp / "MARKER-ds"
    run = _copy(tmp, "deepspeed", "evil-ds")
    path = _poison_deepspeed(run, marker)
    assert_refused(adm(tmp, "train", "--run-dir", str(run), "--data", str(data), "--strategy", "deepspeed",
                       "--set", "total_steps=4", "save_every=2", "num_workers=0", "sample_every=0", "zero_stage=2"),
                   "train", str(path), marker)
    from launch.train.checkpointing import checkpoint_weights, latest_checkpoint, read_run_config
    from diffusion_core.presets import Preset

    with torch.device("meta"):
        module = Preset.from_dict(read_run_config(run)["preset"]).build()
    with pytest.raises(RefusedFile, match="optim_states.pt"):
        checkpoint_weights(latest_checkpoint(run), module, use_ema=False)  # zero_to_fp32's path
    assert not marker.exists()
    # The genuine DeepSpeed run still resumes and exports.
    clean = _copy(tmp, "deepspeed", "clean-ds")
    result = adm(tmp, "train", "--run-dir", str(clean), "--data", str(data), "--strategy", "deepspeed",
                 "--set", "total_steps=4", "save_every=2", "num_workers=0", "sample_every=0", "zero_stage=2")
    assert result.returncode == 0 and "resumed from" in (clean / "log.txt").read_text(), result.stderr[-3000:]
    weights, what = checkpoint_weights(latest_checkpoint(clean), module, use_ema=False)
    assert what == "model (no EMA)" and len(weights) == len(module.state_dict())


def test_crafted_model_and_feature_files_are_refused_in_one_line(work):
    tmp, _ = work
    marker = tmp / "MARKER-pt"
    bad = tmp / "64x64_diffusion.pt"
    torch.save({"w": Bait(marker)}, bad)
    result = adm(tmp, "sample", "--model", f"openai:{bad}", "--out", str(tmp / "s2"), "--num-samples", "1",
                 "--steps", "2", "--device", "cpu")
    assert_refused(result, "sample", str(bad), marker)
    ref = tmp / "ref.npz"
    import numpy as np

    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    result = adm(tmp, "evaluate", str(ref), str(ref), "--features", f"classifier:{bad}")
    assert_refused(result, "evaluate", str(bad), marker)
    with pytest.raises(RefusedFile, match="posix.system|nt.system"):
        load_torch_file(bad, "model file")
    assert not marker.exists()
