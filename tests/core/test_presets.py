"""The named presets: the released configurations (ADM_SPEC section 7) and the small ones."""
from __future__ import annotations

import json

import pytest
import torch

from diffusion_core import presets
from diffusion_core.diffusion import DiffusionConfig
from diffusion_core.presets import Preset
from diffusion_core.unet import ClassifierConfig, UNetConfig

RELEASED = {
    "adm64": ("64x64_diffusion.pt", 295_904_454),
    "adm128": ("128x128_diffusion.pt", 421_529_606),
    "adm256": ("256x256_diffusion.pt", 553_838_086),
    "adm256-uncond": ("256x256_diffusion_uncond.pt", 552_814_086),
    "adm512": ("512x512_diffusion.pt", 558_997_638),
    "adm64-256-upsampler": ("64_256_upsampler.pt", 311_795_910),
    "adm128-512-upsampler": ("128_512_upsampler.pt", 308_835_270),
    "adm64-classifier": ("64x64_classifier.pt", 65_438_568),
    "adm128-classifier": ("128x128_classifier.pt", 42_568_040),
    "adm256-classifier": ("256x256_classifier.pt", 54_096_360),
    "adm512-classifier": ("512x512_classifier.pt", 54_448_360),
}
SMALL = ["tiny-unet", "tiny-classifier", "tiny-upsampler", "demo-unet", "demo-unet-cond", "demo-classifier"]


def test_names():
    assert presets.names(include_small=False) == list(RELEASED)
    assert presets.names() == list(RELEASED) + SMALL


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_parameter_counts_on_meta(name):
    preset = presets.get(name)
    assert (preset.openai_file, preset.num_params) == RELEASED[name]
    with torch.device("meta"):
        model = presets.build(name)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name][1]


def test_released_architecture_facts():
    adm64 = presets.get("adm64").model
    assert (adm64.model_channels, adm64.num_res_blocks, adm64.num_head_channels, adm64.dropout) == (192, 3, 64, 0.1)
    assert adm64.use_new_attention_order
    for name in ["adm128", "adm256", "adm256-uncond", "adm512", "adm64-256-upsampler", "adm128-512-upsampler"]:
        assert not presets.get(name).model.use_new_attention_order, name
    assert presets.get("adm128").model.num_head_channels == -1 and presets.get("adm128").model.num_heads == 4
    assert presets.get("adm256-uncond").model.num_classes is None
    assert presets.get("adm512").model.resolved_channel_mult() == (0.5, 1, 1, 2, 2, 4, 4)
    up = presets.get("adm128-512-upsampler").model
    assert up.super_resolution and up.low_res_size == 128 and up.attention_resolutions == (32, 16)
    assert presets.get("adm64-classifier").model.num_res_blocks == 4
    for name in RELEASED:
        model = presets.get(name).model
        if isinstance(model, UNetConfig):
            assert model.out_channels == 6 and model.use_scale_shift_norm and model.resblock_updown


def test_diffusion_schedules_and_kinds():
    for name in RELEASED:
        p = presets.get(name)
        cosine = name in ("adm64", "adm64-classifier")
        assert p.diffusion.noise_schedule == ("cosine" if cosine else "linear"), name
        assert p.diffusion.steps == 1000 and p.diffusion.learn_sigma
        kind = "classifier" if "classifier" in name else "upsampler" if "upsampler" in name else "diffusion"
        assert p.kind == kind
        assert isinstance(p.model, ClassifierConfig) == (kind == "classifier")


def test_guidance_scales_and_recipes():
    assert presets.get("adm64").guidance["scales"] == {"250": 1.0}
    assert presets.get("adm128").guidance["scales"] == {"250": 0.5, "ddim25": 1.25}
    assert presets.get("adm256").guidance["scales"] == {"250": 1.0, "ddim25": 2.5}
    assert presets.get("adm256-uncond").guidance["scales"] == {"250": 10.0}
    assert presets.get("adm512").guidance == {"classifier": "adm512-classifier", "scales": {"250": 4.0, "ddim25": 9.0}}
    t64, t256 = presets.get("adm64").training, presets.get("adm256").training
    assert (t64["batch_size"], t64["lr"], t64["total_steps"], t64["ema_rate"]) == (2048, 3e-4, 540_000, 0.9999)
    assert (t256["batch_size"], t256["lr"], t256["total_steps"]) == (256, 1e-4, 1_980_000)
    c64, c256 = presets.get("adm64-classifier").training, presets.get("adm256-classifier").training
    assert (c64["lr"], c64["weight_decay"], c64["batch_size"]) == (6e-4, 0.2, 1024)
    assert (c256["lr"], c256["weight_decay"], c256["batch_size"], c256["lr_schedule"]) == (3e-4, 0.05, 256, "linear_decay")
    assert c256["ema_rate"] is None


def test_small_presets():
    unet = presets.get("tiny-unet").model
    assert (unet.image_size, unet.model_channels) == (16, 32)
    up = presets.get("tiny-upsampler").model
    assert (up.image_size, up.low_res_size, up.super_resolution) == (16, 8, True)
    demo = presets.get("demo-unet").model
    assert (demo.image_size, demo.num_classes) == (32, None)
    cond = presets.get("demo-unet-cond").model
    assert (cond.num_classes, cond.null_class) == (10, True)
    clf = presets.get("demo-classifier").model
    assert (clf.image_size, clf.out_channels) == (32, 10)
    assert presets.get("demo-classifier").diffusion == presets.get("demo-unet-cond").diffusion
    for name in SMALL:
        with torch.device("meta"):
            n = sum(p.numel() for p in presets.build(name).parameters())
        assert n < 2_000_000, (name, n)


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="unknown preset 'adm1024'.*adm64, adm128.*tiny-unet"):
        presets.get("adm1024")


def test_overrides():
    p = presets.get("adm64", model_channels=64, **{"diffusion.timestep_respacing": "250", "training.lr": 1e-4})
    assert p.model.model_channels == 64 and p.diffusion.timestep_respacing == "250"
    assert p.training["lr"] == 1e-4 and p.training["batch_size"] == 2048
    assert p.openai_file is None and p.num_params is None  # the released weights no longer fit
    respaced = presets.get("adm256", **{"diffusion.timestep_respacing": "ddim25"})
    assert respaced.openai_file == "256x256_diffusion.pt"  # respacing is a sampling choice
    assert presets.get("adm64") == presets.get("adm64")  # overrides never mutate the registry
    mutable = presets.get("adm64")
    mutable.training["lr"] = 1.0
    assert presets.get("adm64").training["lr"] == 3e-4
    with pytest.raises(ValueError, match="unknown override 'width'"):
        presets.get("adm64", width=3)
    with pytest.raises(ValueError, match="unknown diffusion field 'schedule'"):
        presets.get("adm64", **{"diffusion.schedule": "cosine"})
    with pytest.raises(ValueError, match="not in the pyramid"):
        presets.get("tiny-unet", attention_resolutions=(3,))
    with torch.device("meta"):
        assert presets.build("tiny-unet", model_channels=64).time_embed[0].weight.shape == (256, 64)


@pytest.mark.parametrize("name", ["adm64", "adm128-512-upsampler", "adm256-classifier", "demo-unet-cond"])
def test_preset_dict_round_trip(name):
    preset = presets.get(name)
    d = json.loads(json.dumps(preset.to_dict()))
    assert Preset.from_dict(d) == preset
    assert isinstance(Preset.from_dict(d).diffusion, DiffusionConfig)
    with pytest.raises(ValueError, match="unknown preset field"):
        Preset.from_dict({**d, "colour": "red"})
