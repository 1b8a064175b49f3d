"""Every number a user hands us is finite and in range, or refused in one line before any work.

The headline case: `adm sample --classifier-scale nan` used to exit 0 with all-black samples and NaN
in options.json. Numbers are tried through the command line's main() (argparse included), the
training config and the library calls; sampling really runs (tiny networks) to show nothing is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_core import presets
from launch.model_io import save_model_file

pytestmark = pytest.mark.usefixtures("one_thread")


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def adm(capsys, monkeypatch):
    """`adm(cwd, *args)`: the command line's main() in this process (argparse's exit included)."""
    from launch.cli import main

    def run(cwd: Path, *args: str) -> Result:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def refused(out: Result, command: str, what: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"adm {command}: error: ") and what in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("nets")
    paths = []
    for name in ("tiny-unet", "tiny-classifier"):
        preset = presets.get(name)
        torch.manual_seed(0)
        paths.append(save_model_file(tmp / f"{name}.pt", preset.build().state_dict(), preset))
    return paths[0], paths[1]


@pytest.mark.parametrize("flags, what", [
    (["--classifier-scale", "nan"], "finite"),
    (["--classifier-scale", "inf"], "finite"),
    (["--classifier-scale", "linear:nan:1"], "finite"),
    (["--classifier-scale", "4@0:nan"], "finite"),
    (["--classifier-scale", "1e9"], "within"),
    (["--cfg-scale", "nan"], "finite"),
    (["--eta", "nan", "--sampler", "ddim"], "--eta"),
    (["--eta", "2", "--sampler", "ddim"], "--eta"),
    (["--num-samples", "-3"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--steps", "dpm++2m-5", "--solver-start", "nan"], "--solver-start"),
    (["--steps", "dpm++2m-5", "--solver-start", "5000"], "(0, 999]"),
])
def test_sample_refuses_bad_numbers_and_writes_nothing(tmp_path, adm, nets, flags, what):
    model, clf = nets
    base = ["sample", "--model", str(model), "--classifier", str(clf), "--out", str(tmp_path / "out"),
            "--steps", "2", "--device", "cpu", "--no-progress"]
    if "--num-samples" not in flags:
        base += ["--num-samples", "2"]
    refused(adm(tmp_path, *base, *flags), "sample", what)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.npz"))


def test_a_finite_scale_still_samples(tmp_path, adm, nets):
    model, clf = nets
    out = adm(tmp_path, "sample", "--model", str(model), "--classifier", str(clf), "--classifier-scale", "2.5",
              "--out", str(tmp_path / "ok"), "--num-samples", "2", "--steps", "2", "--device", "cpu", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    options = json.loads((tmp_path / "ok" / "options.json").read_text())
    assert "NaN" not in json.dumps(options) and list((tmp_path / "ok").glob("samples_*.npz"))


def test_non_finite_pixels_are_an_error_not_black_images():
    from launch.sample.files import to_uint8

    x = torch.zeros(1, 3, 2, 2)
    assert to_uint8(x).dtype == torch.uint8
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_uint8(x)


@pytest.mark.parametrize("setting, what", [
    ("lr=nan", "lr"), ("lr=inf", "lr"), ("lr=-1", "lr"), ("weight_decay=nan", "weight_decay"),
    ("adam_eps=0", "adam_eps"), ("adam_betas=[0.9,nan]", "adam_betas"), ("adam_betas=[0.9,1.0]", "adam_betas"),
    ("grad_clip=-inf", "grad_clip"), ("ema_halflife_kimg=nan", "ema_halflife_kimg"),
    ("loss_scale_init=inf", "loss_scale_init"), ("model.dropout=nan", "model.dropout"),
    ("model.dropout=1.5", "model.dropout"), ("num_workers=-1", "num_workers"), ("warmup_steps=-5", "warmup_steps"),
    ("ema_rates=[nan]", "EMA rates"),
])
def test_train_config_numbers(tmp_path, adm, setting, what):
    refused(adm(tmp_path, "train", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path), "--set", setting,
                "--dry-run"), "train", what)


def test_broken_config_files_are_one_line(tmp_path, adm):
    for name, text in (("c.yaml", "lr: [1, 2\n  x: {"), ("c.json", "{lr: 1"), ("c.toml", "lr = = 1"),
                       ("d.yaml", "train: 3\n")):
        (tmp_path / name).write_text(text)
        refused(adm(tmp_path, "train", "--run-dir", str(tmp_path / "r"), "--config", str(tmp_path / name),
                    "--dry-run"), "train", name)


@pytest.mark.parametrize("argv, what", [
    (["evaluate", "a.npz", "b.npz", "--batch-size", "0"], "--batch-size"),
    (["export", "run", "--ema-rate", "nan"], "--ema-rate"),
    (["export", "run", "--ema-rate", "1.5"], "--ema-rate"),
    (["make-reference", "shards", "--size", "0", "--out", "r.npz"], "--size"),
    (["prepare-imagenet", "src", "out", "--workers", "0"], "--workers"),
    (["report", "m", "--out", "r", "--grid-per-class", "-1"], "--grid-per-class"),
    (["pipeline", "p.yaml", "--poll", "nan"], "--poll"),
    (["submit", "report", "--cluster", "local", "--nodes", "0", "--dry-run"], "--nodes"),
])
def test_command_flags(tmp_path, adm, argv, what):
    out = adm(tmp_path, *argv)
    assert out.returncode == 2 and what in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_config_file_cannot_name_a_shell_command(tmp_path, adm):
    (tmp_path / "c.yaml").write_text("data: 'pipe:touch marker && cat x.tar'\n")
    refused(adm(tmp_path, "train", "--run-dir", str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml"),
                "--dry-run"), "train", "runs a shell command")
    assert not (tmp_path / "marker").exists()
