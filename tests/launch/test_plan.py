"""`adm train --dry-run` / `adm sample --dry-run`: the memory and time plan, checked against real runs.

The estimate (fake tensors, nothing allocated) is compared with the measured peak of real CPU
training runs (bench/memory_plan.py: torch storages alive at once, and the peak RSS delta)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_core import presets
from launch.cli import main as adm
from launch.plan import LiveBytes, sampling_steps, trace_sampling_step, trace_training_step
from runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_train_dry_run_prints_the_plan(capsys, tmp_path):
    assert adm(["train", "--run-dir", str(tmp_path / "run"), "--preset", "adm256", "--dry-run", "--precision", "bf16",
                "--strategy", "fsdp", "--world-size", "64", "--gpu", "H100 PCIe", "--set", "batch_size=256"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    plan = out["plan"]
    assert out["train"]["batch_size"] == 256 and plan["micro_batch"] == 4 and plan["world_size"] == 64
    assert plan["parameters"] == 553_838_086 and plan["gpu"] == "H100 PCIe" and plan["peak_tflops"] == 756.5
    parts = plan["memory_per_gpu_bytes"]
    assert parts["weights (fp32, sharded)"] == 4 * 553_838_086 // 64
    assert plan["peak_memory_per_gpu_gib"] == pytest.approx(sum(parts.values()) / 2 ** 30)
    assert plan["images_per_s"] == pytest.approx(0.4 * 756.5e12 * 64 / (plan["gflop_per_image"] * 1e9))
    assert "memory per GPU" in captured.err and "images/s on 64 GPU(s)" in captured.err
    assert not (tmp_path / "run").exists()


def test_dry_run_memory_grows_with_the_micro_batch_and_shrinks_with_sharding(capsys, tmp_path):
    def plan(*extra):
        assert adm(["train", "--run-dir", str(tmp_path / "r"), "--preset", "adm64", "--dry-run", *extra]) == 0
        return json.loads(capsys.readouterr().out)["plan"]

    small, large = plan("--set", "batch_size=8"), plan("--set", "batch_size=32")
    assert large["memory_per_gpu_bytes"]["activations + gradients"] > 3 * small["memory_per_gpu_bytes"]["activations + gradients"] // 2
    ddp, fsdp = plan("--world-size", "8", "--set", "batch_size=64"), plan("--world-size", "8", "--strategy", "fsdp",
                                                                            "--set", "batch_size=64")
    assert fsdp["peak_memory_per_gpu_gib"] < ddp["peak_memory_per_gpu_gib"]


def test_dry_run_bad_world_size_is_one_line(capsys, tmp_path):
    code = adm(["train", "--run-dir", str(tmp_path / "r"), "--preset", "adm64", "--dry-run", "--world-size", "3",
                "--set", "batch_size=64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "must be divisible by world_size" in err
    assert adm(["train", "--run-dir", str(tmp_path / "r"), "--dry-run", "--gpu", "Voodoo 3"]) == 2
    assert "unknown GPU 'Voodoo 3'" in capsys.readouterr().err


def test_sample_dry_run_plan(capsys, tmp_path):
    assert adm(["sample", "--model", "openai:256x256_diffusion.pt", "--classifier", "openai:256x256_classifier.pt",
                "--steps", "ddim25", "--batch-size", "8", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["preset"] == "adm256" and plan["classifier"] == "adm256-classifier" and plan["steps"] == 25
    assert plan["gflop_per_sample"] == pytest.approx(25 * plan["gflop_per_step"])
    assert not (tmp_path / "s").exists()
    assert sampling_steps("250", 1000) == 250 and sampling_steps("10,10,10", 1000) == 30
    assert sampling_steps("dpm++2m-20", 1000) == 20


def test_sampling_step_trace_matches_a_real_step(one_thread):
    """The traced guided step against the same step on real tensors (tiny networks, batch 32)."""
    model_preset, clf_preset = presets.get("tiny-unet"), presets.get("tiny-classifier")
    estimate = trace_sampling_step(model_preset, clf_preset, 32, "fp32", cfg_guidance=False)
    import dataclasses

    model = model_preset.build().eval().requires_grad_(False)
    clf = clf_preset.build().eval().requires_grad_(False)
    diffusion = dataclasses.replace(model_preset.diffusion, timestep_respacing="").build()
    from diffusion_core.guidance import classifier_cond_fn

    cond_fn = classifier_cond_fn(clf, 1.0)
    with LiveBytes() as live:
        x = torch.randn(32, 3, 16, 16)
        t = torch.full((32,), 999, dtype=torch.long)
        y = torch.randint(0, 10, (32,))
        with torch.no_grad():
            diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs={"y": y}, noise=torch.randn_like(x))
    assert 0.75 < estimate / live.peak < 1.25, (estimate, live.peak)


def test_training_trace_on_real_tensors_matches_fake(one_thread):
    """LiveBytes counts the same on real and on fake tensors (the fake trace is the estimate)."""
    preset = presets.get("tiny-unet")
    fake = trace_training_step(preset, 8, "fp32", keep_grads=True)
    model = preset.build().train()
    import dataclasses

    diffusion = dataclasses.replace(preset.diffusion, timestep_respacing="").build()
    with LiveBytes() as live:
        x = torch.randn(8, 3, 16, 16)
        t = torch.randint(0, 1000, (8,))
        y = torch.randint(0, 10, (8,))
        diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean().backward()
    assert fake == pytest.approx(live.peak, rel=0.05)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.launch.test_train_data import digit_shards

    return digit_shards(tmp_path_factory.mktemp("plan") / "digits", per_class=12, size=32, samples_per_shard=10)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy,nproc", [("ddp", 1), ("fsdp", 2), ("deepspeed", 1)])
def test_estimate_within_25_percent_of_a_real_cpu_run(tmp_path, shards, strategy, nproc):
    """A reduced ADM-64 (17.6M parameters, 32 px, dropout 0.1, micro-batch 8) trained for 3 steps."""
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}"]
    cmd = [*launcher, str(ROOT / "bench" / "memory_plan.py"), "--strategy", strategy, "--data", str(shards),
           "--work", str(tmp_path), "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parameters"] == 17_566_150 and report["world_size"] == nproc
    assert 0.75 < report["estimate_over_torch_peak"] < 1.25, report
    assert 0.75 < report["estimate_over_rss_delta"] < 1.25, report
