"""Throughput bookkeeping: FLOPs per training image, the hardware's peak, MFU and peak memory.

MFU = (FLOPs of one training image's forward + backward) x images/s / (peak FLOP/s x devices).
FLOPs are counted once with torch's FlopCounterMode (matmuls, convolutions, attention: the usual
MFU convention). The peak is the datasheet dense number for known GPUs in the training precision
(H200/H100 bf16 989 TFLOP/s), else a measured matmul peak on this device.
"""
from __future__ import annotations

import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense (no sparsity) tensor-core peaks in FLOP/s, by device-name fragment and precision.
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
}


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


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype` (best of a few runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device in `precision`, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAKS.items():
            if key in name and table.get(precision):
                return table[precision], f"{key} datasheet {precision} dense"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 4096 if device.type == "cuda" else 1024
    return measured_matmul_peak(device, dtype, n), f"measured {precision} matmul on {device.type}"


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
