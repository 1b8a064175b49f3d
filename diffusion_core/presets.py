"""Named model configurations: the eleven released ADM checkpoints, plus small ones for tests and the demo.

A `Preset` bundles the network config, the diffusion it belongs to (for a classifier: the schedule
its inputs were noised with), the paper's training recipe, the released file name and parameter
count, and the paper's guidance scales. `get(name, **overrides)` returns one, `build(name)` its network.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from diffusion_core.diffusion import DiffusionConfig
from diffusion_core.unet import (
    ClassifierConfig,
    UNetConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    default_channel_mult,
)

KINDS = ("diffusion", "classifier", "upsampler")
OPENAI_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"


@dataclass(frozen=True)
class Preset:
    """A named, complete model description (see the module docstring)."""

    name: str
    kind: str
    model: UNetConfig | ClassifierConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: dict[str, Any] = field(default_factory=dict)
    openai_file: str | None = None
    num_params: int | None = None
    guidance: dict[str, Any] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"preset kind must be one of {KINDS}, got {self.kind!r}")

    def build(self) -> nn.Module:
        """The network of this preset, freshly initialised on the current default device."""
        return build_model(self.model)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what our model files and run directories store)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "model": config_to_dict(self.model),
            "diffusion": asdict(self.diffusion),
            "training": dict(self.training),
            "openai_file": self.openai_file,
            "num_params": self.num_params,
            "guidance": None if self.guidance is None else dict(self.guidance),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        """Inverse of `to_dict`; unknown fields raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; valid: {sorted(known)}")
        diff_fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
        diffusion = d.get("diffusion") or {}
        bad = sorted(set(diffusion) - diff_fields)
        if bad:
            raise ValueError(f"unknown diffusion field(s) {bad}; valid: {sorted(diff_fields)}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            model=config_from_dict(d["model"]),
            diffusion=DiffusionConfig(**diffusion),
            training=dict(d.get("training") or {}),
            openai_file=d.get("openai_file"),
            num_params=d.get("num_params"),
            guidance=d.get("guidance"),
        )


# ---- training recipes (paper appendix; ADM_SPEC section 7) ----

def _diffusion_recipe(batch_size: int, lr: float, total_steps: int | None) -> dict[str, Any]:
    return {
        "optimizer": "adamw",
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "ema_rate": 0.9999,
        "total_steps": total_steps,
        "lr_schedule": "constant",
        "precision": "fp16",
        "augment": "center_crop_flip",
    }


def _classifier_recipe(batch_size: int, lr: float, weight_decay: float, total_steps: int) -> dict[str, Any]:
    return {
        "optimizer": "adamw",
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "betas": [0.9, 0.999],
        "ema_rate": None,
        "total_steps": total_steps,
        "lr_schedule": "linear_decay",
        "precision": "fp16",
        "augment": "random_crop_flip",
    }


def _adm_unet(size: int, channels: int, blocks: int, **kw: Any) -> UNetConfig:
    kw.setdefault("num_classes", 1000)
    kw.setdefault("num_heads", 4)  # guided-diffusion's flag default (unused where num_head_channels is set)
    return UNetConfig(
        image_size=size,
        model_channels=channels,
        num_res_blocks=blocks,
        channel_mult=kw.pop("channel_mult", None) or default_channel_mult(size, kw.get("super_resolution", False)),
        **kw,
    )


def _adm_classifier(size: int, depth: int) -> ClassifierConfig:
    return ClassifierConfig(
        image_size=size, num_res_blocks=depth, model_channels=128, channel_mult=default_channel_mult(size, False)
    )


_LINEAR = DiffusionConfig(noise_schedule="linear")
_COSINE = DiffusionConfig(noise_schedule="cosine")


def _released() -> list[Preset]:
    return [
        Preset(
            "adm64", "diffusion",
            _adm_unet(64, 192, 3, dropout=0.1, num_head_channels=64, use_new_attention_order=True),
            _COSINE, _diffusion_recipe(2048, 3e-4, 540_000), "64x64_diffusion.pt", 295_904_454,
            {"classifier": "adm64-classifier", "scales": {"250": 1.0}},
        ),
        Preset(
            "adm128", "diffusion", _adm_unet(128, 256, 2, num_heads=4),
            _LINEAR, _diffusion_recipe(256, 1e-4, 4_360_000), "128x128_diffusion.pt", 421_529_606,
            {"classifier": "adm128-classifier", "scales": {"250": 0.5, "ddim25": 1.25}},
        ),
        Preset(
            "adm256", "diffusion", _adm_unet(256, 256, 2, num_head_channels=64),
            _LINEAR, _diffusion_recipe(256, 1e-4, 1_980_000), "256x256_diffusion.pt", 553_838_086,
            {"classifier": "adm256-classifier", "scales": {"250": 1.0, "ddim25": 2.5}},
        ),
        Preset(
            "adm256-uncond", "diffusion", _adm_unet(256, 256, 2, num_head_channels=64, num_classes=None),
            _LINEAR, _diffusion_recipe(256, 1e-4, None), "256x256_diffusion_uncond.pt", 552_814_086,
            {"classifier": "adm256-classifier", "scales": {"250": 10.0}},
        ),
        Preset(
            "adm512", "diffusion", _adm_unet(512, 256, 2, num_head_channels=64),
            _LINEAR, _diffusion_recipe(256, 1e-4, 1_940_000), "512x512_diffusion.pt", 558_997_638,
            {"classifier": "adm512-classifier", "scales": {"250": 4.0, "ddim25": 9.0}},
        ),
        Preset(
            "adm64-256-upsampler", "upsampler",
            _adm_unet(256, 192, 2, num_heads=4, super_resolution=True, low_res_size=64),
            _LINEAR, _diffusion_recipe(256, 1e-4, None), "64_256_upsampler.pt", 311_795_910,
        ),
        Preset(
            "adm128-512-upsampler", "upsampler",
            _adm_unet(512, 192, 2, num_head_channels=64, attention_resolutions=(32, 16),
                      super_resolution=True, low_res_size=128),
            _LINEAR, _diffusion_recipe(256, 1e-4, None), "128_512_upsampler.pt", 308_835_270,
        ),
        Preset(
            "adm64-classifier", "classifier", _adm_classifier(64, 4),
            _COSINE, _classifier_recipe(1024, 6e-4, 0.2, 300_000), "64x64_classifier.pt", 65_438_568,
        ),
        Preset(
            "adm128-classifier", "classifier", _adm_classifier(128, 2),
            _LINEAR, _classifier_recipe(256, 3e-4, 0.05, 300_000), "128x128_classifier.pt", 42_568_040,
        ),
        Preset(
            "adm256-classifier", "classifier", _adm_classifier(256, 2),
            _LINEAR, _classifier_recipe(256, 3e-4, 0.05, 500_000), "256x256_classifier.pt", 54_096_360,
        ),
        Preset(
            "adm512-classifier", "classifier", _adm_classifier(512, 2),
            _LINEAR, _classifier_recipe(256, 3e-4, 0.05, 500_000), "512x512_classifier.pt", 54_448_360,
        ),
    ]


def _small() -> list[Preset]:
    # Widths are multiples of 32 because GroupNorm uses 32 groups. The demo ones train usefully on
    # two CPU cores in a minute or two (3-channel grey digits at 32 px).
    tiny_train = {**_diffusion_recipe(8, 1e-3, 100), "precision": "fp32", "ema_rate": 0.999}
    demo_train = {**_diffusion_recipe(32, 1e-3, 600), "precision": "fp32", "ema_rate": 0.995}
    clf_train = {**_classifier_recipe(32, 1e-3, 0.05, 400), "precision": "fp32"}
    tiny = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                num_head_channels=32)
    demo = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(8,),
                num_head_channels=32)
    return [
        Preset("tiny-unet", "diffusion", UNetConfig(image_size=16, num_classes=10, **tiny),
               _LINEAR, tiny_train, guidance={"classifier": "tiny-classifier", "scales": {"250": 1.0}}),
        Preset("tiny-classifier", "classifier",
               ClassifierConfig(image_size=16, out_channels=10, pool="attention", **tiny),
               _LINEAR, {**clf_train, "batch_size": 8, "total_steps": 100}),
        Preset("tiny-upsampler", "upsampler",
               UNetConfig(image_size=16, num_classes=10, super_resolution=True, low_res_size=8, **tiny),
               _LINEAR, tiny_train),
        Preset("demo-unet", "diffusion", UNetConfig(image_size=32, num_classes=None, **demo),
               _COSINE, demo_train),
        Preset("demo-unet-cond", "diffusion",
               UNetConfig(image_size=32, num_classes=10, null_class=True, **demo),
               _COSINE, demo_train,
               guidance={"classifier": "demo-classifier", "scales": {"250": 1.0}, "cfg_scale": 2.0}),
        Preset("demo-classifier", "classifier",
               ClassifierConfig(image_size=32, out_channels=10, pool="attention", **demo),
               _COSINE, clf_train),
    ]


_PRESETS: dict[str, Preset] = {p.name: p for p in _released() + _small()}
RELEASED = tuple(p.name for p in _released())


def names(include_small: bool = True) -> list[str]:
    """Preset names: the eleven released configurations first, then (by default) the small ones."""
    return list(_PRESETS) if include_small else list(RELEASED)


def get(name: str, **overrides: Any) -> Preset:
    """The preset `name` with `overrides` applied.

    Overrides name model-config fields (`model_channels=64`), diffusion fields with a prefix
    (`**{"diffusion.noise_schedule": "cosine"}`) or training-recipe keys (`**{"training.lr": 1e-4}`).
    A changed model or diffusion drops `openai_file` and `num_params` (the weights no longer fit).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(_PRESETS)}")
    registered = _PRESETS[name]
    # Fresh dicts: a caller editing preset.training must not change the registry.
    preset = dataclasses.replace(
        registered, training=copy.deepcopy(registered.training), guidance=copy.deepcopy(registered.guidance)
    )
    if not overrides:
        return preset
    model_kw, diff_kw, train_kw = {}, {}, {}
    model_fields = {f.name for f in dataclasses.fields(preset.model)}
    diff_fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
    for key, value in overrides.items():
        if key.startswith("diffusion."):
            sub = key[len("diffusion."):]
            if sub not in diff_fields:
                raise ValueError(f"unknown diffusion field {sub!r} in override {key!r}; valid: {sorted(diff_fields)}")
            diff_kw[sub] = value
        elif key.startswith("training."):
            train_kw[key[len("training."):]] = value
        elif key.startswith("model."):
            key = key[len("model."):]
            if key not in model_fields:
                raise ValueError(f"unknown model field {key!r} for preset {name!r}; valid: {sorted(model_fields)}")
            model_kw[key] = value
        elif key in model_fields:
            model_kw[key] = value
        else:
            raise ValueError(
                f"unknown override {key!r} for preset {name!r}: use a model field {sorted(model_fields)}, "
                "'diffusion.<field>' or 'training.<key>'"
            )
    model = dataclasses.replace(preset.model, **model_kw) if model_kw else preset.model
    diffusion = dataclasses.replace(preset.diffusion, **diff_kw) if diff_kw else preset.diffusion
    # Respacing is a sampling choice: the released weights still fit.
    weights_changed = model != preset.model or dataclasses.replace(
        diffusion, timestep_respacing=""
    ) != dataclasses.replace(preset.diffusion, timestep_respacing="")
    return dataclasses.replace(
        preset,
        model=model,
        diffusion=diffusion,
        training={**preset.training, **train_kw},
        openai_file=None if weights_changed else preset.openai_file,
        num_params=None if weights_changed else preset.num_params,
    )


def build(name: str, **overrides: Any) -> nn.Module:
    """Build the network of preset `name` (with overrides), on the current default device.

    Use `with torch.device("meta"): build("adm256")` to inspect a large model without allocating it.
    """
    return get(name, **overrides).build()
