"""Compatibility with OpenAI's guided-diffusion: its flags, its released checkpoints, its key names.

Our module tree uses the original key names one to one, so loading a released state dict is a
strict `load_state_dict` after a check that reports every missing, unexpected or mis-shaped key,
and exporting is our own state dict. No file I/O here (see launch/model_io.py for files).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from diffusion_core.diffusion import DiffusionConfig
from diffusion_core.unet import ClassifierConfig, UNetConfig, build_model, default_channel_mult

# guided-diffusion's defaults (script_util.model_and_diffusion_defaults and friends).
UNET_FLAG_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}
SR_FLAG_DEFAULTS = {"large_size": 256, "small_size": 64}
CLASSIFIER_FLAG_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
    "channel_mult": "",
}
DIFFUSION_FLAG_DEFAULTS: dict[str, Any] = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
# Flags of the original scripts that do not describe the network; accepted and ignored so a whole
# flag set from the README can be passed as is. use_fp16: we run reduced precision with autocast.
_IGNORED = {
    "use_fp16", "classifier_use_fp16", "classifier_scale", "batch_size", "num_samples", "use_ddim",
    "clip_denoised", "model_path", "classifier_path", "base_samples", "microbatch", "lr", "weight_decay",
    "lr_anneal_steps", "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "fp16_scale_growth",
    "data_dir", "val_data_dir", "noised", "iterations", "anneal_lr", "schedule_sampler", "eval_interval",
} | set(DIFFUSION_FLAG_DEFAULTS) - {"learn_sigma"}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flag {name} must be a boolean (True/False), got {value!r}")


def _ints(name: str, value: Any) -> tuple[int, ...]:
    try:
        if isinstance(value, str):
            return tuple(int(v) for v in value.split(",") if v.strip())
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"flag {name} must be a comma-separated list of integers like '32,16,8', got {value!r}") from None


def _mult(value: Any) -> tuple[float, ...] | None:
    if value in ("", None):
        return None
    try:
        parts = [float(v) for v in value.split(",")] if isinstance(value, str) else [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"flag channel_mult must be '' or a comma list like '1,2,3,4', got {value!r}") from None
    return tuple(int(p) if p.is_integer() else p for p in parts)


def _merge(
    defaults: Mapping[str, Any], flags: Mapping[str, Any], allowed_extra: set[str], other: set[str]
) -> dict[str, Any]:
    # `other`: the other network's flags, so one flag set for model + classifier can be passed to both.
    unknown = sorted(set(flags) - set(defaults) - allowed_extra - other - _IGNORED)
    if unknown:
        raise ValueError(f"unknown guided-diffusion flag(s) {unknown}; known: {sorted(set(defaults) | allowed_extra)}")
    return {**defaults, **{k: v for k, v in flags.items() if k in defaults or k in allowed_extra}}


def unet_config_from_openai_flags(**flags: Any) -> UNetConfig:
    """The UNetConfig that guided-diffusion's create_model (or sr_create_model, when `large_size`
    or `small_size` is given) would build from these flags, with the original defaults."""
    sr = "large_size" in flags or "small_size" in flags
    f = _merge(UNET_FLAG_DEFAULTS, flags, set(SR_FLAG_DEFAULTS) if sr else set(), set(CLASSIFIER_FLAG_DEFAULTS))
    if sr:
        f = {**SR_FLAG_DEFAULTS, **f}
        size = int(f["large_size"])
    else:
        size = int(f["image_size"])
    mult = _mult(f["channel_mult"]) or default_channel_mult(size, sr)
    return UNetConfig(
        image_size=size,
        in_channels=3,
        model_channels=int(f["num_channels"]),
        out_channels=6 if _bool("learn_sigma", f["learn_sigma"]) else 3,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_resolutions=_ints("attention_resolutions", f["attention_resolutions"]),
        dropout=float(f["dropout"]),
        channel_mult=mult,
        num_classes=1000 if _bool("class_cond", f["class_cond"]) else None,
        use_checkpoint=_bool("use_checkpoint", f["use_checkpoint"]),
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=_bool("use_scale_shift_norm", f["use_scale_shift_norm"]),
        resblock_updown=_bool("resblock_updown", f["resblock_updown"]),
        use_new_attention_order=_bool("use_new_attention_order", f["use_new_attention_order"]),
        super_resolution=sr,
        low_res_size=int(f["small_size"]) if sr else None,
    )


def classifier_config_from_openai_flags(**flags: Any) -> ClassifierConfig:
    """The ClassifierConfig that guided-diffusion's create_classifier would build from these flags."""
    f = _merge(CLASSIFIER_FLAG_DEFAULTS, flags, set(), set(UNET_FLAG_DEFAULTS) | set(SR_FLAG_DEFAULTS))
    size = int(f["image_size"])
    return ClassifierConfig(
        image_size=size,
        in_channels=3,
        model_channels=int(f["classifier_width"]),
        out_channels=1000,
        num_res_blocks=int(f["classifier_depth"]),
        attention_resolutions=_ints("classifier_attention_resolutions", f["classifier_attention_resolutions"]),
        channel_mult=_mult(f["channel_mult"]) or default_channel_mult(size),
        num_head_channels=64,
        use_scale_shift_norm=_bool("classifier_use_scale_shift_norm", f["classifier_use_scale_shift_norm"]),
        resblock_updown=_bool("classifier_resblock_updown", f["classifier_resblock_updown"]),
        pool=str(f["classifier_pool"]),
    )


def diffusion_config_from_openai_flags(**flags: Any) -> DiffusionConfig:
    """The DiffusionConfig of guided-diffusion's create_gaussian_diffusion for these flags.

    Model and classifier flags are ignored. rescale_timesteps=True is refused: the released models
    do not use it and our models always receive the original integer timesteps.
    """
    f = {**DIFFUSION_FLAG_DEFAULTS, **{k: v for k, v in flags.items() if k in DIFFUSION_FLAG_DEFAULTS}}
    if _bool("rescale_timesteps", f["rescale_timesteps"]):
        raise ValueError("rescale_timesteps=True is not supported (no released model uses it); drop the flag")
    return DiffusionConfig(
        steps=int(f["diffusion_steps"]),
        noise_schedule=str(f["noise_schedule"]),
        learn_sigma=_bool("learn_sigma", f["learn_sigma"]),
        predict_xstart=_bool("predict_xstart", f["predict_xstart"]),
        use_kl=_bool("use_kl", f["use_kl"]),
        rescale_learned_sigmas=_bool("rescale_learned_sigmas", f["rescale_learned_sigmas"]),
        timestep_respacing=str(f["timestep_respacing"]),
    )


def unet_from_openai_flags(**flags: Any) -> nn.Module:
    """Build our UNet from guided-diffusion's flag names and defaults (e.g. the README's flags).

    channel_mult "" means ADM's default for the size; attention_resolutions is a comma string of
    resolutions in pixels. `large_size`/`small_size` build the super-resolution model.
    """
    return build_model(unet_config_from_openai_flags(**flags))


def classifier_from_openai_flags(**flags: Any) -> nn.Module:
    """Build our noisy classifier from guided-diffusion's classifier flag names and defaults."""
    return build_model(classifier_config_from_openai_flags(**flags))


def openai_flags(config: UNetConfig | ClassifierConfig) -> dict[str, Any]:
    """guided-diffusion flags that build the same network (for its scripts or an external check)."""
    res = ",".join(str(r) for r in config.attention_resolutions)
    mult = ",".join(str(m) for m in config.resolved_channel_mult())
    if isinstance(config, ClassifierConfig):
        return {
            "image_size": config.image_size,
            "classifier_width": config.model_channels,
            "classifier_depth": config.num_res_blocks,
            "classifier_attention_resolutions": res,
            "classifier_use_scale_shift_norm": config.use_scale_shift_norm,
            "classifier_resblock_updown": config.resblock_updown,
            "classifier_pool": config.pool,
            "channel_mult": mult,
        }
    if config.null_class or config.in_channels != 3 or config.out_channels not in (3, 6):
        raise ValueError("this UNet has no guided-diffusion equivalent (null class or non-RGB channels)")
    if config.num_classes not in (None, 1000):
        raise ValueError(f"guided-diffusion's class_cond means 1000 classes; this model has {config.num_classes}")
    flags: dict[str, Any] = {
        "num_channels": config.model_channels,
        "num_res_blocks": config.num_res_blocks,
        "num_heads": config.num_heads,
        "num_heads_upsample": config.num_heads_upsample,
        "num_head_channels": config.num_head_channels,
        "attention_resolutions": res,
        "channel_mult": mult,
        "dropout": config.dropout,
        "class_cond": config.num_classes is not None,
        "use_checkpoint": config.use_checkpoint,
        "use_scale_shift_norm": config.use_scale_shift_norm,
        "resblock_updown": config.resblock_updown,
        "use_new_attention_order": config.use_new_attention_order,
        "learn_sigma": config.out_channels == 6,
    }
    if config.super_resolution:
        flags["large_size"] = config.image_size
        flags["small_size"] = config.low_res_size or config.image_size // 4
    else:
        flags["image_size"] = config.image_size
    return flags


def _describe(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys of `state_dict` for `module`."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {_describe(misshaped)}")
        raise ValueError(
            "state dict does not fit the model (wrong preset or flags?): " + "; ".join(parts)
        )


def load_openai_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a released guided-diffusion state dict into `module` strictly; returns `module`.

    Every key must be present with its shape, or a ValueError lists the missing, unexpected and
    mis-shaped ones. A module on the meta device takes the given tensors (converted to its
    parameter dtype), so names and shapes can be checked, or a model materialised, without a
    random initialisation.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(state_dict).__name__}")
    check_state_dict(module, state_dict)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        own = module.state_dict()
        cast = OrderedDict((k, state_dict[k].to(dtype=own[k].dtype)) for k in own)
        module.load_state_dict(cast, strict=True, assign=True)
    else:
        module.load_state_dict(dict(state_dict), strict=True)
    return module


def to_openai_state_dict(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The module's weights under guided-diffusion's key names (ours are the same), detached, on CPU."""
    return OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items())


def preset_for_openai_file(filename: str) -> str:
    """The preset name of a released file, e.g. "256x256_diffusion.pt" -> "adm256" (directories ignored)."""
    from diffusion_core import presets

    base = str(filename).replace("\\", "/").rsplit("/", 1)[-1]
    table = {presets.get(n).openai_file: n for n in presets.names(include_small=False)}
    if base not in table:
        raise ValueError(
            f"{base!r} is not a released guided-diffusion file; known: {', '.join(sorted(table))}. "
            "Pass the preset explicitly"
        )
    return table[base]
