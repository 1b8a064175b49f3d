"""Throughput bookkeeping: FLOPs per training image, the hardware's peak, MFU and peak memory.

MFU = (FLOPs of one training image's forward + backward) x images/s / (peak FLOP/s x devices).
FLOPs are counted once with torch's FlopCounterMode (matmuls, convolutions, attention: the usual
MFU convention). The peak is the datasheet's dense tensor-core number of the exact GPU model in
the arithmetic the run actually uses: bf16/fp16 for those precisions, TF32 for fp32 runs when
TF32 is enabled for matmuls or convolutions (cuDNN enables it by default), plain fp32 otherwise.
Dividing by a smaller number than the run can reach would give MFU above 100 %. Besides, the
trainer measures a large matmul on the device at start-up and logs both numbers; on CPUs and on
GPUs missing from the table the measured number is the peak.
"""
from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

T = 1e12


@dataclass(frozen=True)
class GpuPeaks:
    """Dense (no sparsity) datasheet peaks of one GPU model in FLOP/s (0 = no such arithmetic),
    and its memory in GiB (for the dry-run plan)."""

    label: str
    fp32: float
    tf32: float
    bf16: float
    fp16: float
    memory_gib: float = 0.0


# NVIDIA datasheets; the tensor-core numbers there are quoted "with sparsity", halved here.
# Checked in order: the first whose pattern matches torch.cuda.get_device_name() wins.
GPU_PEAKS: list[tuple[str, GpuPeaks]] = [
    (r"GH200", GpuPeaks("GH200", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T, 96)),
    (r"H200.*NVL", GpuPeaks("H200 NVL", 60 * T, 417.5 * T, 835.5 * T, 835.5 * T, 141)),
    (r"H200", GpuPeaks("H200 SXM", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T, 141)),
    (r"H100.*NVL", GpuPeaks("H100 NVL", 60 * T, 417.5 * T, 835.5 * T, 835.5 * T, 94)),
    (r"H100.*PCI[eE]", GpuPeaks("H100 PCIe", 51 * T, 378 * T, 756.5 * T, 756.5 * T, 80)),
    (r"H100", GpuPeaks("H100 SXM", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T, 80)),  # "NVIDIA H100 80GB HBM3"
    (r"A100.*80GB.*PCI[eE]|A100.*PCI[eE].*80GB", GpuPeaks("A100 80GB PCIe", 19.5 * T, 156 * T, 312 * T, 312 * T, 80)),
    (r"A100.*PCI[eE]", GpuPeaks("A100 40GB PCIe", 19.5 * T, 156 * T, 312 * T, 312 * T, 40)),
    (r"A100.*80GB", GpuPeaks("A100 80GB SXM", 19.5 * T, 156 * T, 312 * T, 312 * T, 80)),
    (r"A100", GpuPeaks("A100 40GB SXM", 19.5 * T, 156 * T, 312 * T, 312 * T, 40)),
    (r"L40S", GpuPeaks("L40S", 91.6 * T, 183 * T, 362.05 * T, 362.05 * T, 48)),
    (r"L40\b", GpuPeaks("L40", 90.5 * T, 90.5 * T, 181.05 * T, 181.05 * T, 48)),
    (r"L4\b", GpuPeaks("L4", 30.3 * T, 60 * T, 121 * T, 121 * T, 24)),
    (r"A40\b", GpuPeaks("A40", 37.4 * T, 74.8 * T, 149.7 * T, 149.7 * T, 48)),
    (r"A10\b", GpuPeaks("A10", 31.2 * T, 62.5 * T, 125 * T, 125 * T, 24)),
    (r"V100.*PCI[eE].*32GB", GpuPeaks("V100 PCIe 32GB", 14 * T, 0.0, 0.0, 112 * T, 32)),
    (r"V100.*PCI[eE]", GpuPeaks("V100 PCIe", 14 * T, 0.0, 0.0, 112 * T, 16)),
    (r"V100.*32GB", GpuPeaks("V100 SXM2 32GB", 15.7 * T, 0.0, 0.0, 125 * T, 32)),
    (r"V100", GpuPeaks("V100 SXM2", 15.7 * T, 0.0, 0.0, 125 * T, 16)),
]


def gpu_peaks(device_name: str) -> GpuPeaks | None:
    """The datasheet peaks of a GPU from its name (torch.cuda.get_device_name), None if unknown."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, device_name):
            return peaks
    return None


def tf32_enabled() -> bool:
    """Whether float32 matmuls or convolutions on CUDA may use TF32 tensor cores."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def arithmetic(precision: str, tf32: bool | None = None) -> str:
    """The tensor-core arithmetic a run in `precision` uses: fp32, tf32, bf16 or fp16."""
    if precision != "fp32":
        return precision
    return "tf32" if (tf32_enabled() if tf32 is None else tf32) else "fp32"


def datasheet_peak(device_name: str, precision: str, tf32: bool | None = None) -> tuple[float, str]:
    """(dense peak FLOP/s, description) of a named GPU in a run's arithmetic; (0, reason) if unknown."""
    peaks = gpu_peaks(device_name)
    mode = arithmetic(precision, tf32)
    if peaks is None:
        return 0.0, f"{device_name!r} is not in the peak table"
    value = getattr(peaks, mode)
    if not value:
        return 0.0, f"{peaks.label} has no {mode} tensor cores"
    return value, f"{peaks.label} datasheet, {mode} dense"


def _cpu_attention_flops() -> dict:
    # FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel; same formula.
    ops = torch.ops.aten
    table = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        table[ops._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
        table[ops._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v))
    return table


def _example_inputs(preset, batch: int, device):
    size = preset.model.image_size
    x = torch.randn(batch, preset.model.in_channels, size, size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    kwargs = {}
    if preset.kind != "classifier" and getattr(preset.model, "num_classes", None):
        kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    if getattr(preset.model, "super_resolution", False):
        low = preset.model.low_res_size or size // 4
        kwargs["low_res"] = torch.randn(batch, preset.model.in_channels, low, low, device=device)
    return x, t, kwargs


def _count(module, preset, device) -> int:
    x, t, kwargs = _example_inputs(preset, 1, device)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        module(x, t, **kwargs).float().sum().backward()
    return int(counter.get_total_flops())


def flops_per_image(preset, device: torch.device | str = "cpu") -> int:
    """FLOPs of the forward and backward pass of one image through the preset's network.

    Counted on fake tensors (no arithmetic) when the network allows it, else with one real
    image on `device`.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            module = preset.build()
            return _count(module, preset, "cpu")
    except Exception:  # a data-dependent check in the network: count with real numbers
        pass
    module = preset.build().to(device)
    try:
        return _count(module, preset, device)
    finally:
        del module


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                         repeat: int = 5) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype` (best of `repeat` timed runs).

    On CUDA, n = 8192 and each timed run is 10 back-to-back matmuls between CUDA events; fp32
    uses TF32 exactly when the run does (torch.backends flags as set).
    """
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    inner = 10 if cuda else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        best = min(best, seconds / inner)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device in `precision`, where the number comes from).

    The datasheet's dense peak of the GPU in the arithmetic the run uses (TF32 for fp32 runs when
    enabled); a measured matmul for CPUs and GPUs missing from the table.
    """
    if device.type == "cuda":
        peak, source = datasheet_peak(torch.cuda.get_device_name(device), precision)
        if peak:
            return peak, source
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    mode = arithmetic(precision) if device.type == "cuda" else precision
    return measured_matmul_peak(device, dtype), f"measured {mode} matmul on {device.type}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class Throughput:
    """Images/s and MFU over the window since the last `read()`."""

    def __init__(self, flops_per_image: float, peak: float, world_size: int):
        self.flops_per_image = flops_per_image
        self.peak = peak
        self.world_size = world_size
        self.images = 0
        self.start = time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> dict[str, float]:
        """{"images_per_s", "mfu"} for the window; starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.images / elapsed
        mfu = rate * self.flops_per_image / (self.peak * self.world_size) if self.peak > 0 else 0.0
        self.images, self.start = 0, time.perf_counter()
        return {"images_per_s": rate, "mfu": mfu}
