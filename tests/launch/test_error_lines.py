"""Every error a user can cause is one line `adm CMD: error: ...` with exit status 2, never a traceback.

The inputs are the ones that used to escape as tracebacks: a forged label file (MemoryError), YAML
that does not parse (YAMLError), a damaged run folder, an argparse error inside the library call.
Each runs through `launch.cli.main`, as `adm` does, or in a fresh process where the entry matters.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core import presets
from launch.cli import main
from launch.model_io import save_model_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def adm(capsys, monkeypatch):
    def run(cwd: Path, *args: str) -> tuple[int, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


def one_line(code: int, err: str, command: str, what: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"adm {command}: error: ") and what in lines[0], err


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    preset = presets.get("tiny-unet")
    torch.manual_seed(0)
    return save_model_file(tmp_path_factory.mktemp("m") / "m.pt", preset.build().state_dict(), preset)


def _forged_header(shape) -> bytes:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<i8", "fortran_order": False, "shape": shape})
    return head.getvalue() + np.arange(10, dtype="<i8").tobytes()


def test_forged_label_files_are_refused_before_allocating(tmp_path, adm, model):
    (tmp_path / "l.npy").write_bytes(_forged_header((10 ** 12,)))
    with zipfile.ZipFile(tmp_path / "l.npz", "w") as z:
        z.writestr("arr_1.npy", _forged_header((10 ** 12,)))
    for name in ("l.npy", "l.npz"):
        code, err = adm(tmp_path, "sample", "--model", str(model), "--labels", name, "--out", "s",
                        "--num-samples", "2", "--steps", "2", "--device", "cpu", "--no-progress")
        one_line(code, err, "sample", "header declares shape (1000000000000,)")


def test_out_of_memory_is_one_line(tmp_path, adm, model):
    code, err = adm(tmp_path, "sample", "--model", str(model), "--labels", "balanced", "--out", "s",
                    "--num-samples", str(10 ** 15), "--steps", "2", "--device", "cpu", "--no-progress")
    one_line(code, err, "sample", "out of memory")
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.npz"))


def test_yaml_errors_are_one_line(tmp_path, adm):
    (tmp_path / "c.yaml").write_text("lr: [1, 2\n  x: {")
    one_line(*adm(tmp_path, "train", "--run-dir", "r", "--config", "c.yaml", "--dry-run"), "train", "not valid YAML")
    (tmp_path / "p.yaml").write_text("stages: [\n")
    one_line(*adm(tmp_path, "pipeline", "p.yaml", "--local", "--dry-run"), "pipeline", "not valid YAML")
    (tmp_path / "site.yaml").write_text("partition: [\n")
    one_line(*adm(tmp_path, "submit", "report", "m", "--out", "r", "--cluster", "site.yaml", "--dry-run"),
             "submit", "not valid YAML")
    one_line(*adm(tmp_path, "demo", "--out", "d", "--set", "scales=[1, 2"), "demo", "not a YAML value")


def test_damaged_run_folders_are_one_line(tmp_path, adm):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000000002").mkdir(parents=True)
    (run / "config.json").write_text("{not json")
    one_line(*adm(tmp_path, "export", str(run)), "export", "not valid JSON")
    (run / "config.json").write_text(json.dumps({"preset": {"name": "x"}}))
    one_line(*adm(tmp_path, "export", str(run)), "export", "config.json")
    (run / "config.json").write_text(json.dumps([1, 2]))
    one_line(*adm(tmp_path, "sample", "--model", str(run), "--out", "s", "--num-samples", "1", "--device", "cpu"),
             "sample", "not a training run's config")


def test_argparse_errors_return_2_from_main(tmp_path, adm):
    code, err = adm(tmp_path, "sample", "--model", "m", "--out", "o", "--batch-size", "0")
    assert code == 2 and err.strip().splitlines()[-1] == \
        "adm sample: error: argument --batch-size: must be an integer >= 1, got 0"


def test_the_console_entry_prints_no_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: [1, 2\n  x: {")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--run-dir", "r", "--config", "c.yaml",
                          "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("adm train: error: config file c.yaml is not valid YAML")
