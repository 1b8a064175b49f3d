"""bench/device.sh: refuses cleanly without a GPU; its Python part runs end to end on the CPU (--cpu).

The GPU run itself cannot happen here (no GPU); this checks that the one prepared script is sound
so that one call on a GPU machine measures everything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", TORCH_EXTENSIONS_DIR=str(tmp / "ext"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "device.sh")]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "r.json"
    result = subprocess.run(["bash", str(ROOT / "bench" / "device.sh"), str(out)], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        f"bench/device.sh: error: no CUDA device visible to {sys.executable} (run it on a GPU machine, "
        "or --cpu for a smoke run)"]


@pytest.mark.slow
def test_cpu_smoke_run_fills_every_section(tmp_path):
    out = tmp_path / "device.json"
    result = subprocess.run(["bash", str(ROOT / "bench" / "device.sh"), "--cpu", str(out)], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert report["mode"] == "cpu-smoke" and set(sections) == {"env", "train", "sample", "eval"}
    assert not [name for name, body in sections.items() if "error" in body or "skipped" in body], sections
    train = sections["train"]["tiny-unet"]
    assert 0 < train["mfu"] <= 1 and train["images_per_s"] > 0
    assert train["host_syncs"]["counted"] == 0, train["host_syncs"]
    assert sections["sample"]["ddpm"]["step_s"] > 0 and sections["sample"]["dpm_solver++"]["steps"] == 3
    assert sections["eval"]["inception"]["images_per_s"] > 0 and 0 <= sections["eval"]["precision_recall"]["recall"] <= 1
