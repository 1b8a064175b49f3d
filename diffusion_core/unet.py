"""The ADM networks: the diffusion UNet (optionally super-resolution) and the noisy EncoderUNet classifier.

Configs are frozen dataclasses validated on construction, so a bad configuration fails with a
ValueError naming the field before any weight is allocated. The module tree reproduces the released
guided-diffusion checkpoints' key names and shapes exactly (see `openai_compat`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
import torch.nn.functional as F
from torch import nn

from diffusion_core.nn_blocks import (
    ATTENTION_IMPLS,
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    normalization,
    resolve_heads,
    timestep_embedding,
    zero_module,
)

POOLS = ("attention", "adaptive", "spatial", "spatial_v2")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def default_channel_mult(image_size: int, super_resolution: bool = False) -> tuple[float, ...]:
    """ADM's channel multipliers by image size (guided-diffusion's defaults).

    The super-resolution models use (1,1,2,2,4,4) at 512 as at 256.
    """
    table = {
        64: (1, 2, 3, 4),
        128: (1, 1, 2, 3, 4),
        256: (1, 1, 2, 2, 4, 4),
        512: (1, 1, 2, 2, 4, 4) if super_resolution else (0.5, 1, 1, 2, 2, 4, 4),
    }
    if image_size not in table:
        raise ValueError(
            f"no default channel_mult for image_size={image_size} (ADM defines 64, 128, 256, 512); "
            "pass channel_mult explicitly, e.g. (1, 2, 2)"
        )
    return table[image_size]


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _ConfigMixin:
    """Shared checks of the UNet and classifier configs (the encoder pyramid is the same)."""

    image_size: int
    model_channels: int
    channel_mult: tuple[float, ...] | None
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int

    def resolved_channel_mult(self) -> tuple[float, ...]:
        """`channel_mult`, or ADM's default for the image size when it is None."""
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        return default_channel_mult(self.image_size, getattr(self, "super_resolution", False))

    def level_channels(self) -> list[int]:
        """Feature channels at each level of the pyramid."""
        return [int(m * self.model_channels) for m in self.resolved_channel_mult()]

    def attention_downsample_rates(self) -> set[int]:
        """Attention resolutions as downsampling rates (what the original code's flags hold)."""
        return {self.image_size // r for r in self.attention_resolutions}

    def _check_pyramid(self, heads: list[tuple[int, int]]) -> None:
        for name in ("image_size", "model_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        mult = self.resolved_channel_mult()
        if not mult or any(m <= 0 for m in mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive numbers, got {mult!r}")
        levels = len(mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2^{levels - 1} = {2 ** (levels - 1)} "
                f"(channel_mult has {levels} levels); change the image size or the number of levels"
            )
        pyramid = [self.image_size // 2**i for i in range(levels)]
        bad = [r for r in self.attention_resolutions if r not in pyramid]
        if bad:
            raise ValueError(
                f"attention resolution(s) {bad} not in the pyramid {pyramid} of image_size={self.image_size} "
                f"with {levels} levels; choose attention_resolutions from {pyramid}"
            )
        for ch in self.level_channels():
            if ch % 32:
                raise ValueError(
                    f"a level has {ch} channels, not a multiple of 32 (GroupNorm uses 32 groups); "
                    "choose model_channels * channel_mult as multiples of 32"
                )
        ds_attn = self.attention_downsample_rates()
        for level, ch in enumerate(self.level_channels()):
            if 2**level in ds_attn or level == levels - 1:  # the middle block always attends
                for num_heads, num_head_channels in heads:
                    resolve_heads(ch, num_heads, num_head_channels)


@dataclass(frozen=True)
class UNetConfig(_ConfigMixin):
    """Configuration of the ADM diffusion UNet (see docs/networks.md for every field).

    attention_resolutions are in pixels (e.g. (32, 16, 8)); channel_mult None means ADM's default
    for image_size; num_classes None means unconditional; null_class adds label index num_classes
    meaning "no label" (classifier-free guidance); super_resolution makes forward take `low_res`
    (of size low_res_size when that is set).
    """

    image_size: int
    model_channels: int
    num_res_blocks: int
    in_channels: int = 3
    out_channels: int = 6
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] | None = None
    num_classes: int | None = None
    null_class: bool = False
    use_checkpoint: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    super_resolution: bool = False
    low_res_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", _as_tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        self._check_pyramid([(self.num_heads, self.num_head_channels), (heads_up, self.num_head_channels)])
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None (unconditional) or >= 1, got {self.num_classes}")
        if self.null_class and self.num_classes is None:
            raise ValueError("null_class=True needs num_classes (the null label is index num_classes)")
        if self.low_res_size is not None and not self.super_resolution:
            raise ValueError("low_res_size is only meaningful with super_resolution=True")


@dataclass(frozen=True)
class ClassifierConfig(_ConfigMixin):
    """Configuration of the noisy classifier (ADM's EncoderUNet); see docs/networks.md.

    pool: "attention" (released models), "adaptive", "spatial" or "spatial_v2". The attention pool
    and the body's attention use num_head_channels per head; the pool always uses the new qkv order,
    the body uses `use_new_attention_order` (False in the released classifiers).
    """

    image_size: int
    num_res_blocks: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[float, ...] | None = None
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    pool: str = "attention"
    use_checkpoint: bool = False
    dropout: float = 0.0
    use_new_attention_order: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", _as_tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise ValueError("the attention pool needs num_head_channels (ADM uses 64), not -1")
        self._check_pyramid([(1, self.num_head_channels)])
        if self.out_channels < 1 or self.in_channels < 1:
            raise ValueError("in_channels and out_channels must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _check_timesteps(t: Any, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"timesteps must have shape [{batch}] (one per image) or be a scalar, got {tuple(t.shape)}"
        )
    return t


def _check_images(x: torch.Tensor, channels: int, divisor: int, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{what} must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} has {x.shape[1]} channels, the model expects {channels}")
    if x.shape[2] % divisor or x.shape[3] % divisor:
        raise ValueError(
            f"{what} spatial size {tuple(x.shape[2:])} is not divisible by {divisor} (2^(levels-1)); "
            "pad or resize the input"
        )


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class _Encoder(nn.Module):
    """Shared constructor of the encoder half and the middle block (UNet and classifier)."""

    def _build_time_embed(self, model_channels: int) -> int:
        """ADM's timestep MLP (sinusoids of `model_channels` -> 4x that width); returns the width."""
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        return emb_dim

    def _build_encoder(self, cfg, emb_dim: int, in_channels: int, num_heads: int, num_head_channels: int) -> list[int]:
        mult = cfg.resolved_channel_mult()
        attn_ds = cfg.attention_downsample_rates()
        ch = int(mult[0] * cfg.model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans = [ch]
        ds = 1
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                out_ch = int(m * cfg.model_channels)
                layers: list[nn.Module] = [self._res(cfg, ch, emb_dim, out_ch)]
                ch = out_ch
                if ds in attn_ds:
                    layers.append(self._attn(cfg, ch, num_heads, num_head_channels))
                self.input_blocks.append(TimestepSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                if cfg.resblock_updown:
                    down: nn.Module = self._res(cfg, ch, emb_dim, ch, down=True)
                else:
                    down = Downsample(ch, use_conv=True, out_channels=ch)
                self.input_blocks.append(TimestepSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(
            self._res(cfg, ch, emb_dim, ch),
            self._attn(cfg, ch, num_heads, num_head_channels),
            self._res(cfg, ch, emb_dim, ch),
        )
        self._ds = ds
        return chans

    @staticmethod
    def _res(cfg, ch: int, emb_dim: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            ch,
            emb_dim,
            cfg.dropout,
            out_channels=out_ch,
            use_scale_shift_norm=cfg.use_scale_shift_norm,
            use_checkpoint=cfg.use_checkpoint,
            up=up,
            down=down,
        )

    @staticmethod
    def _attn(cfg, ch: int, num_heads: int, num_head_channels: int) -> AttentionBlock:
        return AttentionBlock(
            ch,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_checkpoint=cfg.use_checkpoint,
            use_new_attention_order=cfg.use_new_attention_order,
        )

    def set_attention_impl(self, impl: str) -> None:
        """Switch every attention (blocks and pool) to `impl` ("sdpa" or "original"); weights are unchanged."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
        for module in self.modules():
            if isinstance(module, (AttentionBlock, AttentionPool2d)):
                module.impl = impl

    def set_memory_format(self, memory_format: str) -> None:
        """Layout of the activations inside forward: "channels_last", "contiguous" (NCHW), or "auto"
        (the default: channels-last on CPU, where oneDNN convolutions and GroupNorm run about twice
        as fast with it, NCHW elsewhere). Inputs and outputs are unaffected; results agree to rounding."""
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory format {memory_format!r}; choose one of {MEMORY_FORMATS}")
        self.memory_format = memory_format

    def _to_layout(self, x: torch.Tensor) -> torch.Tensor:
        fmt = getattr(self, "memory_format", "auto")
        if fmt == "channels_last" or (fmt == "auto" and x.device.type == "cpu"):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _embed_time(self, t: torch.Tensor) -> torch.Tensor:
        # float32 sinusoids, then the embedding MLP's own dtype (a module converted with .to(bf16) works).
        emb = timestep_embedding(t, self.config.model_channels)
        return self.time_embed(emb.to(self.time_embed[0].weight.dtype))


class UNetModel(_Encoder):
    """The ADM diffusion UNet. Call `unet(x, t, y=None, low_res=None)` -> [N, out_channels, H, W].

    `t` holds the original (un-respaced) timesteps, `y` integer class labels (required for a
    class-conditional model without a null class; with a null class y=None means "no label"),
    `low_res` the low-resolution image of a super-resolution model (bilinearly upsampled to x's size
    and concatenated to it).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"UNetModel needs a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        emb_dim = self._build_time_embed(cfg.model_channels)
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + int(cfg.null_class), emb_dim)
        in_ch = cfg.in_channels * (2 if cfg.super_resolution else 1)
        chans = self._build_encoder(cfg, emb_dim, in_ch, cfg.num_heads, cfg.num_head_channels)
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        mult = cfg.resolved_channel_mult()
        attn_ds = cfg.attention_downsample_rates()
        ds = self._ds
        ch = chans[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for i in range(cfg.num_res_blocks + 1):
                out_ch = int(mult[level] * cfg.model_channels)
                layers: list[nn.Module] = [self._res(cfg, ch + chans.pop(), emb_dim, out_ch)]
                ch = out_ch
                if ds in attn_ds:
                    layers.append(self._attn(cfg, ch, heads_up, cfg.num_head_channels))
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        layers.append(self._res(cfg, ch, emb_dim, ch, up=True))
                    else:
                        layers.append(Upsample(ch, use_conv=True, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )
        self._divisor = 2 ** (len(mult) - 1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """Predict the model output (eps and, with learned sigma, the variance interpolation v)."""
        cfg = self.config
        _check_images(x, cfg.in_channels, self._divisor)
        timesteps = _check_timesteps(timesteps, x.shape[0], x.device)
        emb = self._embed_time(timesteps)
        if cfg.num_classes is not None:
            emb = emb + self.label_emb(self._check_labels(y, x.shape[0], x.device))
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but got labels y; pass y=None")
        if cfg.super_resolution:
            x = torch.cat([x, self._upsample_low_res(low_res, x)], dim=1)
        elif low_res is not None:
            raise ValueError("low_res given to a model that is not a super-resolution model")
        hs = []
        h = self._to_layout(x)
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).contiguous()

    def _check_labels(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        cfg = self.config
        if y is None:
            if not cfg.null_class:
                raise ValueError(
                    f"this model is class-conditional ({cfg.num_classes} classes): pass labels y of shape [{batch}]"
                )
            return torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        if y.shape != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels y must be an integer tensor of shape [{batch}], got {y.dtype} {tuple(y.shape)}")
        limit = cfg.num_classes + int(cfg.null_class)
        # An asynchronous assert, never a read-back: reading labels back would make the host wait
        # for the device at every step. It fails at once on a CPU (reported with the value below)
        # and as a device-side assert on a GPU.
        if batch and not _is_tracing() and not is_fake(y):
            try:
                torch._assert_async(((y >= 0) & (y < limit)).all(), "label out of range")
            except RuntimeError:
                lo, hi = (int(v) for v in torch.aminmax(y))
                bad = lo if lo < 0 else hi
                extra = f" (index {cfg.num_classes} is the null label)" if cfg.null_class else ""
                raise ValueError(f"label {bad} out of range: labels must be in [0, {limit}){extra}") from None
        return y

    def _upsample_low_res(self, low_res: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if low_res is None:
            raise ValueError("super-resolution model: pass the low-resolution image as low_res=[N, C, h, w]")
        _check_images(low_res, cfg.in_channels, 1, what="low_res")
        if low_res.shape[0] != x.shape[0]:
            raise ValueError(f"low_res has batch {low_res.shape[0]}, x has {x.shape[0]}")
        if cfg.low_res_size is not None and tuple(low_res.shape[2:]) != (cfg.low_res_size,) * 2:
            raise ValueError(
                f"low_res must be {cfg.low_res_size}x{cfg.low_res_size}, got {tuple(low_res.shape[2:])}"
            )
        return F.interpolate(low_res, size=x.shape[2:], mode="bilinear").to(x.dtype)


class EncoderUNet(_Encoder):
    """ADM's noisy classifier: the UNet encoder and middle block, then a pooling head.

    Call `clf(x, t)` -> logits [N, out_channels]; `t` holds the original timesteps.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise ValueError(f"EncoderUNet needs a ClassifierConfig, got {type(config).__name__}")
        self.config = cfg = config
        emb_dim = self._build_time_embed(cfg.model_channels)
        chans = self._build_encoder(cfg, emb_dim, cfg.in_channels, 1, cfg.num_head_channels)
        ch = chans[-1]
        if cfg.pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(cfg.image_size // self._ds, ch, cfg.num_head_channels, cfg.out_channels),
            )
        elif cfg.pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, cfg.out_channels, 1)),
                nn.Flatten(),
            )
        else:
            # The spatial pools read the mean of every block's output (and the middle block's).
            feature_size = sum(chans) + ch
            if cfg.pool == "spatial":
                self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, cfg.out_channels))
            else:
                self.out = nn.Sequential(
                    nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, cfg.out_channels)
                )
        self._divisor = 2 ** (len(cfg.resolved_channel_mult()) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **unused: Any) -> torch.Tensor:
        """Class logits of noisy images x at (original) timesteps."""
        cfg = self.config
        _check_images(x, cfg.in_channels, self._divisor)
        if cfg.pool == "attention" and tuple(x.shape[2:]) != (cfg.image_size,) * 2:
            raise ValueError(
                f"the attention-pool classifier takes {cfg.image_size}x{cfg.image_size} images "
                f"(its positional embedding is fixed), got {tuple(x.shape[2:])}"
            )
        emb = self._embed_time(_check_timesteps(timesteps, x.shape[0], x.device))
        spatial = cfg.pool.startswith("spatial")
        feats = []
        h = self._to_layout(x)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                feats.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            feats.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(feats, dim=-1))
        return self.out(h)


def build_model(config: UNetConfig | ClassifierConfig) -> nn.Module:
    """Build the UNetModel or EncoderUNet that `config` describes (on the current default device)."""
    if isinstance(config, UNetConfig):
        return UNetModel(config)
    if isinstance(config, ClassifierConfig):
        return EncoderUNet(config)
    raise ValueError(f"build_model needs a UNetConfig or ClassifierConfig, got {type(config).__name__}")


_TYPES = {"unet": UNetConfig, "classifier": ClassifierConfig}


def config_to_dict(config: UNetConfig | ClassifierConfig) -> dict[str, Any]:
    """JSON-ready dict of a model config; `d["type"]` is "unet" or "classifier"."""
    for name, cls in _TYPES.items():
        if type(config) is cls:
            d = asdict(config)
            return {"type": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}
    raise ValueError(f"config_to_dict needs a UNetConfig or ClassifierConfig, got {type(config).__name__}")


def config_from_dict(d: dict[str, Any]) -> UNetConfig | ClassifierConfig:
    """Inverse of `config_to_dict`; unknown fields raise ValueError naming them."""
    if not isinstance(d, dict) or d.get("type") not in _TYPES:
        raise ValueError(f"a model config dict needs 'type' in {sorted(_TYPES)}, got {d.get('type') if isinstance(d, dict) else d!r}")
    cls = _TYPES[d["type"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    body = {k: v for k, v in d.items() if k != "type"}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ValueError(f"unknown {d['type']} config field(s) {unknown}; valid fields: {sorted(fields)}")
    return cls(**body)
