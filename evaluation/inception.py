"""The FID Inception-v3 network (the 2015-12-05 TensorFlow graph) and its preprocessing, in PyTorch.

ADM's numbers were computed with TensorFlow's `classify_image_graph_def.pb`. The PyTorch port of that
graph (`pt_inception-2015-12-05-6726825d.pth`) differs from torchvision's Inception-v3 in ways that
change FID: average-pool branches exclude padding from the mean (TF's default), the last block
max-pools in its pool branch, the classifier has 1008 outputs, and the input is resized with TF1's
legacy bilinear grid. This module rebuilds that graph so the released file loads strictly
(472 tensors: the file carries no `num_batches_tracked`, so the batch norms here are frozen
affine layers without one) and returns the three outputs ADM's evaluator reads:

- `pool`    (N, 2048): the global average pool after the last block (FID, precision/recall);
- `spatial` (N, 2023): post-ReLU `Mixed_6d.branch1x1`, first 7 channels, flattened H, W, C (sFID);
- `logits`  (N, 1008): `pool @ fc.weight.T`, without the bias (Inception Score).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008


def tf1_bilinear_resize(x, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize on TensorFlow 1's legacy grid (`align_corners=False`, no half-pixel centres).

    Output pixel `i` reads source coordinate `i * in / out` (computed in float32, as TF does), so the
    image is anchored at its top-left corner and the last rows/columns repeat the edge; no
    antialiasing when shrinking. `x` is NCHW (a tensor or numpy array; floats, or integers which are
    converted to float32); returns a float tensor of shape (N, C, size, size).
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.ndim != 4:
        raise ValueError(f"tf1_bilinear_resize expects an NCHW batch, got shape {tuple(x.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[-2:]
    y0, y1, wy = _legacy_grid(in_h, out_h, x.device)
    x0, x1, wx = _legacy_grid(in_w, out_w, x.device)
    wy = wy.to(x.dtype)[:, None]
    wx = wx.to(x.dtype)
    # TF interpolates along the width on the two source rows, then between the rows.
    top = x[:, :, y0, :]
    bottom = x[:, :, y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy


def _legacy_grid(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower/upper source indices and interpolation weights of TF1's legacy resize along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale  # float32 products, like TF's kernel
    low = np.floor(src)
    frac = (src - low).astype(np.float32)
    low = low.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    return (torch.from_numpy(low).to(device), torch.from_numpy(high).to(device),
            torch.from_numpy(frac).to(device))


def preprocess(images, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (or 0..255 float) NHWC images -> the network's NCHW input: TF1 resize to 299, then (x-128)/128."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images of shape (N, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[-2:] != (size, size):
        x = tf1_bilinear_resize(x, size)
    return (x - 128.0) / 128.0


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm: scale, shift and running statistics, no `num_batches_tracked`.

    The released weights hold exactly these four tensors per layer; `nn.BatchNorm2d` would add a
    fifth that the file lacks, and strict loading would then depend on checkpoint version metadata.
    """

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_parameter("weight", nn.Parameter(torch.ones(channels)))
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels)))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class ConvUnit(nn.Module):
    """Convolution without bias, frozen batch norm (eps 0.001, TF's value), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pooling divides by the number of real pixels under the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and avg-pool branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvUnit(cin, 64, 1)
        self.branch5x5_1 = ConvUnit(cin, 48, 1)
        self.branch5x5_2 = ConvUnit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, padding=1)
        self.branch_pool = ConvUnit(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class BlockB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvUnit(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvUnit(cin, 192, 1)
        self.branch7x7_1 = ConvUnit(cin, c7, 1)
        self.branch7x7_2 = ConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvUnit(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvUnit(cin, c7, 1)
        self.branch7x7dbl_2 = ConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvUnit(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvUnit(cin, 192, 1)

    def forward(self, x, taps: dict | None = None):
        b1 = self.branch1x1(x)
        if taps is not None:
            taps["branch1x1"] = b1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for unit in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = unit(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvUnit(cin, 192, 1)
        self.branch3x3_2 = ConvUnit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvUnit(cin, 192, 1)
        self.branch7x7x3_2 = ConvUnit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvUnit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvUnit(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b, Mixed_7c).

    `max_pool=True` is the TF graph's last block, whose pool branch max-pools instead of averaging.
    """

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvUnit(cin, 320, 1)
        self.branch3x3_1 = ConvUnit(cin, 384, 1)
        self.branch3x3_2a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvUnit(cin, 448, 1)
        self.branch3x3dbl_2 = ConvUnit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvUnit(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor     # (N, 2048)
    spatial: torch.Tensor  # (N, 2023)
    logits: torch.Tensor   # (N, 1008)


class FIDInception(nn.Module):
    """Inception-v3 as in TensorFlow's 2015-12-05 graph; parameter names match the FID port's file.

    `forward(images)` takes uint8 (or 0..255 float) NHWC images of any size and returns
    `InceptionFeatures(pool, spatial, logits)`; `forward_preprocessed(x)` takes the already
    resized and normalised NCHW input. Weights are random until `load_state_dict` (see
    `evaluation.weights.load_fid_inception`).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images) -> InceptionFeatures:
        x = preprocess(images).to(self.fc.weight.device)
        return self.forward_preprocessed(x)

    def forward_preprocessed(self, x: torch.Tensor) -> InceptionFeatures:
        """Features of an already resized (299x299) and normalised NCHW batch."""
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        taps: dict = {}
        x = self.Mixed_6d(x, taps=taps)
        x = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        # TF's tensors are NHWC: ADM's evaluator flattens (h, w, c), channel fastest.
        spatial = taps["branch1x1"][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = pool @ self.fc.weight.T  # the graph's softmax reads the matmul before the bias add
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)
