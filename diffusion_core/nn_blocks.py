"""Building blocks of the ADM networks: normalisation, timestep embedding, ResBlock, attention.

Module and parameter names follow the released guided-diffusion checkpoints one to one
(`in_layers.0`, `emb_layers.1`, `out_layers.3`, `qkv`, `proj_out`, ...), so a released state dict
loads strictly and our weights export without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Attention implementations. "sdpa" is ours; "original" reproduces guided-diffusion's hand-written
# einsum attention (q and k each scaled by d^-1/4, float32 softmax) and its habit of always
# recomputing attention in the backward pass. It exists for benchmarks and reference tests.
ATTENTION_IMPLS = ("sdpa", "original")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype.

    Under fp16/bf16 autocast the statistics of wide feature maps lose too much precision; the
    original network normalises in float32 for the same reason.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Meta tensors (shape checks, FLOP counting) have no autocast state to ask about.
        if x.dtype == torch.float32 and (x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type)):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The network's only normalisation: 32 groups (ADM's choice) computed in float32."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos(t f_i), sin(t f_i)]` with `f_i = exp(-ln(max_period) i / half)`.

    `timesteps` is a 1-D tensor of N (possibly fractional) timesteps; returns float32 [N, dim].
    An odd `dim` is padded with one zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep (and class) embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """nn.Sequential that hands the embedding to the children that want it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution (same parameters as nn.Conv2d(cin, cout, 1)).

    On channels-last activations it is a plain matmul over the channel axis: PyTorch's CPU
    convolution falls back to a slow kernel for 1x1 channels-last inputs (about 1.8x slower).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv, or 2x2 average pooling (key `op`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count; use use_conv=True")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block with timestep conditioning.

    With `use_scale_shift_norm` (AdaGN) the embedding gives (scale, shift) and the block computes
    `GN(h) * (1 + scale) + shift`; otherwise the embedding is added before the second GroupNorm.
    `up`/`down` resample inside the block (BigGAN style): nearest / average pooling on both the
    main path (between the first norm+SiLU and the first conv) and the skip path.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = PointwiseConv2d(channels, self.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _heads_from_tokens(qkv: torch.Tensor, num_heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """Split token-major qkv [B, T, 3*H*d] into q, k, v of shape [B, H, T, d] (d contiguous, no copy).

    The channel axis of qkv is (head, {q,k,v}, d) in the legacy order and ({q,k,v}, head, d) in the
    new order. Keeping d contiguous lets F.scaled_dot_product_attention use its fused kernels.
    """
    b, length, width = qkv.shape
    d = width // (3 * num_heads)
    if new_order:
        return qkv.view(b, length, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return qkv.view(b, length, num_heads, 3, d).permute(3, 0, 2, 1, 4).unbind(0)


def sdpa_attention(qkv: torch.Tensor, num_heads: int, new_order: bool, query_len: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head on token-major qkv [B, T, 3C]; returns [B, T', C].

    T' = query_len (the first tokens' queries only) or T. The fused kernels accumulate the softmax
    in float32 also for half-precision inputs.
    """
    q, k, v = _heads_from_tokens(qkv, num_heads, new_order)
    if query_len is not None:
        q = q[:, :, :query_len]
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def original_attention(
    qkv: torch.Tensor, num_heads: int, new_order: bool, query_len: int | None = None
) -> torch.Tensor:
    """guided-diffusion's attention on channel-major qkv [B, 3C, T]; returns [B, C, T'].

    Hand-written einsums with q and k each scaled by d^-1/4 (keeps fp16 from overflowing) and an
    explicit float32 softmax. Kept as the reference for tests and benchmarks.
    """
    b, width, length = qkv.shape
    d = width // (3 * num_heads)
    if new_order:
        q, k, v = (p.reshape(b * num_heads, d, length) for p in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * num_heads, 3 * d, length).split(d, dim=1)
    if query_len is not None:
        q = q[:, :, :query_len]
    scale = 1.0 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(b, num_heads * d, out.shape[-1])


def _linear_tokens(tokens: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    # A kernel-1 Conv1d on [B, C, T] is a Linear on [B, T, C]; the released weights are conv-shaped.
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


def resolve_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads for `channels`: fixed `num_heads`, or channels / num_head_channels when that is not -1."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide {channels} attention channels; "
                "choose a divisor or set num_head_channels"
            )
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"num_head_channels={num_head_channels} does not divide {channels} attention channels; "
            "choose a divisor (ADM uses 64) or set num_head_channels=-1 and num_heads"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: GN, 1x1 qkv, attention, zero-init 1x1 out.

    `impl` selects the attention implementation (see ATTENTION_IMPLS); it is a plain attribute, not
    part of the state dict. Gradient checkpointing follows `use_checkpoint` only (the original always
    recomputed attention); impl="original" restores that behaviour for comparisons.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = resolve_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.impl = "sdpa"
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.use_checkpoint or self.impl == "original"
        if recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if self.impl == "original":
            x = x.reshape(b, c, -1)
            h = original_attention(self.qkv(self.norm(x)), self.num_heads, self.new_order)
            return (x + self.proj_out(h)).reshape(b, c, *spatial)
        if self.impl != "sdpa":
            raise ValueError(f"unknown attention implementation {self.impl!r}; choose one of {ATTENTION_IMPLS}")
        # Token-major [B, T, C]: free for channels-last activations, and what SDPA wants.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        h = sdpa_attention(_linear_tokens(tokens, self.qkv), self.num_heads, self.new_order)
        h = _linear_tokens(h, self.proj_out).transpose(1, 2).reshape(b, c, *spatial)
        return x + h


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: a mean token plus learned positions, one multi-head attention.

    Only the mean token's output is used, so only its query is computed. Always the "new" qkv order.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = resolve_heads(embed_dim, 1, num_head_channels)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        if self.impl == "original":
            h = original_attention(self.qkv_proj(x), self.num_heads, new_order=True, query_len=1)
            return self.c_proj(h)[:, :, 0]
        h = sdpa_attention(_linear_tokens(x.transpose(1, 2), self.qkv_proj), self.num_heads, True, query_len=1)
        return _linear_tokens(h, self.c_proj)[:, 0]
