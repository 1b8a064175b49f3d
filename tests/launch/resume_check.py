"""Helpers of the exact-resume tests: interrupt a real training run, and compare two runs bit for bit.

`assert_same_run(reference, resumed)` compares every logged TensorBoard scalar (except the timing
ones: images/s, MFU, peak memory) step by step, and every value of the final checkpoint: model,
optimizer and EMA (torch.distributed.checkpoint, read back in one process), DeepSpeed's own files,
the trainer state (step, loss scaler, timestep sampler, config) and every rank's RNG states and data
position, bitwise (torch.equal, same dtype).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

TIMING_TAGS = {"train/images_per_s", "train/mfu", "train/peak_memory_gb"}
# Measured at each start-up (the matmul peak, FLOPs per image): facts about the machine, not the run's state.
MEASURED_PREFIX = "perf/"


# ----------------------------------------------------------------------------------------------
# Processes

def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (DataLoader workers in their own process group included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    children.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 of the whole process tree (launcher, ranks, loader workers), then reap the launcher."""
    pids = descendants(proc.pid)
    signal_tree(pids, signal.SIGSTOP)  # nobody reacts to a sibling's death while we collect them
    signal_tree(descendants(proc.pid), signal.SIGKILL)
    proc.wait(timeout=60)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the expected point"
        assert time.time() < end, "timed out waiting for the run"
        time.sleep(poll)


def logged(run_dir: Path, step: int) -> bool:
    """True once RUN/log.txt has the metrics line of `step`."""
    log = run_dir / "log.txt"
    return log.is_file() and f"step {step} | loss" in log.read_text()


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{step:09d}" / "meta.json").is_file()


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int, **popen) -> None:
    """Start `cmd`; once checkpoint `step` is complete and step+1 logged, kill -9 the whole tree."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        wait_for(lambda: complete(run_dir, step) and logged(run_dir, step + 1), proc)
    finally:
        kill_tree(proc)


def kill_during_checkpoint(cmd: list[str], run_dir: Path, steps: tuple[int, ...], **popen) -> int:
    """Start `cmd`; kill -9 the tree while it writes one of the checkpoints `steps` (the first caught).

    The tree is stopped (SIGSTOP) the moment the checkpoint's temporary folder appears, checked to be
    incomplete, then killed. Returns the step whose write was interrupted.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    folder = run_dir / "checkpoints"
    try:
        for step in steps:
            tmp, final = folder / f".tmp-step_{step:09d}", folder / f"step_{step:09d}"
            wait_for(lambda: tmp.exists() or final.exists(), proc, poll=0.001)
            pids = descendants(proc.pid)
            signal_tree(pids, signal.SIGSTOP)
            if not (final / "meta.json").exists():
                assert tmp.exists()
                return step
            signal_tree(pids, signal.SIGCONT)  # too late for this one: catch the next
        raise AssertionError(f"could not catch any of the checkpoint writes {steps} in progress")
    finally:
        kill_tree(proc)


# ----------------------------------------------------------------------------------------------
# What a run produced

def logged_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar but the timing ones: tag -> {step: value} (a rerun step's last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in acc.Tags()["scalars"] if tag not in TIMING_TAGS and not tag.startswith(MEASURED_PREFIX)}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in value):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
        _flatten(vars(value), f"{prefix}<{type(value).__name__}>", out)
    else:
        out[prefix] = value


def _load(path: Path) -> Any:
    """torch.load without running code; DeepSpeed's optimizer files hold its LossScaler objects."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        allowed = []
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_values(folder: Path) -> dict[str, Any]:
    """Every value stored in a checkpoint folder, by path (see module doc)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out: dict[str, Any] = {}
    _flatten(json.loads((folder / "meta.json").read_text()), "meta.json", out)
    for path in sorted(folder.glob("*.pt")):
        _flatten(_load(path), path.name, out)
    if (folder / "state").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(folder / "state"), str(Path(tmp) / "state.pt"))
            _flatten(torch.load(Path(tmp) / "state.pt", weights_only=True), "state", out)
    for path in sorted((folder / "deepspeed").rglob("*.pt")):
        _flatten(_load(path), f"deepspeed/{path.relative_to(folder / 'deepspeed')}", out)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_same_run(reference: Path, resumed: Path, final_step: int) -> None:
    """The resumed run logged the same scalars and ended with the same checkpoint, bit for bit."""
    ref_scalars, got_scalars = logged_scalars(reference), logged_scalars(resumed)
    assert sorted(got_scalars) == sorted(ref_scalars)
    assert sorted(ref_scalars["train/loss"]) == list(range(1, final_step + 1))
    for tag, values in ref_scalars.items():
        got = got_scalars[tag]
        assert sorted(got) == sorted(values) and all(_same(values[s], got[s]) for s in values), \
            f"scalar {tag} differs: {values} vs {got}"
    name = f"step_{final_step:09d}"
    ref, got = checkpoint_values(reference / "checkpoints" / name), checkpoint_values(resumed / "checkpoints" / name)
    assert sorted(got) == sorted(ref)
    assert len(ref) > 50, sorted(ref)  # model, optimizer, EMA, RNG and loader state are all in there
    differing = [key for key in ref if not _same(ref[key], got[key])]
    assert not differing, f"{len(differing)} of {len(ref)} checkpoint values differ, e.g. {differing[:8]}"
