"""MFU: the peak is the one of the exact GPU model in the arithmetic the run uses; MFU stays <= 1."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import presets
from launch.train import perf
from launch.train.perf import Throughput, arithmetic, datasheet_peak, gpu_peaks, measured_matmul_peak, peak_flops

T = 1e12


@pytest.mark.parametrize("name,label,bf16,tf32,fp32", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 494.7, 67),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 378, 51),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 417.5, 60),
    ("NVIDIA H200", "H200 SXM", 989.4, 494.7, 67),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 417.5, 60),
    ("NVIDIA GH200 480GB", "GH200", 989.4, 494.7, 67),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM", 312, 156, 19.5),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312, 156, 19.5),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe", 312, 156, 19.5),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 312, 156, 19.5),
    ("NVIDIA L40S", "L40S", 362.05, 183, 91.6),
    ("NVIDIA L40", "L40", 181.05, 90.5, 90.5),
    ("NVIDIA L4", "L4", 121, 60, 30.3),
    ("NVIDIA A40", "A40", 149.7, 74.8, 37.4),
    ("NVIDIA A10", "A10", 125, 62.5, 31.2),
])
def test_peak_table_per_sku(name, label, bf16, tf32, fp32):
    peaks = gpu_peaks(name)
    assert peaks.label == label
    assert datasheet_peak(name, "bf16") == (pytest.approx(bf16 * T), f"{label} datasheet, bf16 dense")
    assert datasheet_peak(name, "fp16")[0] == pytest.approx(bf16 * T)
    assert datasheet_peak(name, "fp32", tf32=True) == (pytest.approx(tf32 * T), f"{label} datasheet, tf32 dense")
    assert datasheet_peak(name, "fp32", tf32=False)[0] == pytest.approx(fp32 * T)


@pytest.mark.parametrize("name,memory", [("NVIDIA A100-SXM4-40GB", 40), ("NVIDIA A100-SXM4-80GB", 80),
                                         ("NVIDIA H100 80GB HBM3", 80), ("NVIDIA H100 NVL", 94), ("NVIDIA H200", 141),
                                         ("Tesla V100-SXM2-16GB", 16), ("Tesla V100-SXM2-32GB", 32)])
def test_memory_per_sku(name, memory):
    assert gpu_peaks(name).memory_gib == memory


def test_unknown_gpus_and_missing_arithmetic_fall_back_to_a_measurement():
    assert datasheet_peak("NVIDIA GeForce RTX 9999", "bf16") == (0.0, "'NVIDIA GeForce RTX 9999' is not in the peak table")
    assert datasheet_peak("Tesla V100-SXM2-32GB", "bf16") == (0.0, "V100 SXM2 32GB has no bf16 tensor cores")
    assert datasheet_peak("Tesla V100-PCIE-16GB", "fp16")[0] == pytest.approx(112 * T)


@pytest.fixture
def tf32_flags():
    """Restore the global TF32 switches (torch.backends.cuda.matmul is not monkeypatch-able)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_runs_use_the_tf32_peak_when_tf32_is_on(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: convolutions in TF32
    assert arithmetic("fp32") == "tf32" and arithmetic("bf16") == "bf16"
    torch.backends.cudnn.allow_tf32 = False
    assert arithmetic("fp32") == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = True
    assert arithmetic("fp32") == "tf32"


def test_simulated_tf32_device_mfu_is_at_most_one(monkeypatch, tf32_flags):
    """An H100 running fp32 with TF32 at its full TF32 rate: MFU 1.0, not 7.4 (TF32 / plain fp32 peak)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, source = peak_flops(torch.device("cuda", 0), "fp32")
    assert (peak, source) == (pytest.approx(494.7 * T), "H100 SXM datasheet, tf32 dense")
    flops = 3.0e12  # per image
    meter = Throughput(flops, peak, world_size=8)
    meter.images = int(8 * 494.7 * T / flops * 10)  # ten seconds at the TF32 rate on 8 devices
    meter.start -= 10.0
    mfu = meter.read()["mfu"]
    assert 0.95 < mfu <= 1.0


def test_cpu_fp32_mfu_is_at_most_one(one_thread):
    """A real fp32 CPU training step timed against the measured matmul peak of the same threads."""
    preset = presets.get("tiny-unet")
    model = preset.build()
    flops = perf.flops_per_image(preset)
    peak = measured_matmul_peak(torch.device("cpu"))
    x, t = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,))
    y = torch.randint(0, 10, (8,))
    model(x, t, y=y).sum().backward()  # warm-up
    meter = Throughput(flops, peak, world_size=1)
    for _ in range(3):
        model(x, t, y=y).sum().backward()
        meter.add(8)
    mfu = meter.read()["mfu"]
    assert 0.0 < mfu <= 1.0
