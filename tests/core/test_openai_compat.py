"""OpenAI guided-diffusion compatibility: the released files' keys and shapes, flags, strict loading, export.

data/released_checkpoint_keys.txt lists the parameter names and shapes of the eleven released
files (reconstructed from the original constructors; totals match the paper).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffusion_core import presets
from diffusion_core.openai_compat import (
    classifier_config_from_openai_flags,
    classifier_from_openai_flags,
    diffusion_config_from_openai_flags,
    load_openai_state_dict,
    openai_flags,
    preset_for_openai_file,
    to_openai_state_dict,
    unet_config_from_openai_flags,
    unet_from_openai_flags,
)

KEYS_FILE = Path(__file__).parent / "data" / "released_checkpoint_keys.txt"

# The flags of guided-diffusion's README for each released file.
_MODEL = dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, learn_sigma=True,
              noise_schedule="linear", resblock_updown=True, use_fp16=True, use_scale_shift_norm=True)
README_FLAGS = {
    "64x64_diffusion.pt": {**_MODEL, "dropout": 0.1, "image_size": 64, "noise_schedule": "cosine", "num_channels": 192,
                           "num_head_channels": 64, "num_res_blocks": 3, "use_new_attention_order": True},
    "128x128_diffusion.pt": {**_MODEL, "image_size": 128, "num_channels": 256, "num_heads": 4, "num_res_blocks": 2},
    "256x256_diffusion.pt": {**_MODEL, "image_size": 256, "num_channels": 256, "num_head_channels": 64,
                             "num_res_blocks": 2},
    "256x256_diffusion_uncond.pt": {**_MODEL, "class_cond": False, "image_size": 256, "num_channels": 256,
                                    "num_head_channels": 64, "num_res_blocks": 2},
    "512x512_diffusion.pt": {**_MODEL, "image_size": 512, "num_channels": 256, "num_head_channels": 64,
                             "num_res_blocks": 2},
    "64_256_upsampler.pt": {**_MODEL, "large_size": 256, "small_size": 64, "num_channels": 192, "num_heads": 4,
                            "num_res_blocks": 2},
    "128_512_upsampler.pt": {**_MODEL, "attention_resolutions": "32,16", "large_size": 512, "small_size": 128,
                             "num_channels": 192, "num_head_channels": 64, "num_res_blocks": 2},
}
_CLF = dict(classifier_attention_resolutions="32,16,8", classifier_depth=2, classifier_width=128,
            classifier_pool="attention", classifier_resblock_updown=True, classifier_use_scale_shift_norm=True)
CLASSIFIER_FLAGS = {
    "64x64_classifier.pt": {**_CLF, "image_size": 64, "classifier_depth": 4},
    "128x128_classifier.pt": {**_CLF, "image_size": 128},
    "256x256_classifier.pt": {**_CLF, "image_size": 256},
    "512x512_classifier.pt": {**_CLF, "image_size": 512},
}


def released_keys() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    files: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    current = None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("### "):
            current = line.split()[1]
            files[current] = []
        elif line and not line.startswith("#"):
            name, shape = line.split("\t")
            files[current].append((name, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return files


RELEASED = released_keys()


def test_keys_file_covers_all_released_presets():
    assert len(RELEASED) == 11
    assert {presets.get(n).openai_file for n in presets.names(include_small=False)} == set(RELEASED)


@pytest.mark.parametrize("filename", list(RELEASED))
def test_released_names_and_shapes_load_strictly_on_meta(filename):
    name = preset_for_openai_file(filename)
    with torch.device("meta"):
        model = presets.build(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == RELEASED[filename]  # same names, shapes and order; no buffers
    state = {k: torch.empty(shape, device="meta") for k, shape in RELEASED[filename]}
    assert load_openai_state_dict(model, state) is model
    assert sum(p.numel() for p in model.parameters()) == presets.get(name).num_params


def test_mismatched_state_dicts_name_the_keys():
    filename = "128x128_classifier.pt"
    with torch.device("meta"):
        model = presets.build(preset_for_openai_file(filename))
    state = {k: torch.empty(shape, device="meta") for k, shape in RELEASED[filename]}
    missing = dict(state)
    del missing["out.2.positional_embedding"]
    with pytest.raises(ValueError, match=r"missing keys: out\.2\.positional_embedding"):
        load_openai_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys: label_emb\.weight"):
        load_openai_state_dict(model, {**state, "label_emb.weight": torch.empty(1000, 512, device="meta")})
    bad = {**state, "time_embed.0.weight": torch.empty(512, 256, device="meta")}
    with pytest.raises(ValueError, match=r"mis-shaped keys: time_embed\.0\.weight \(file \(512, 256\), model \(512, 128\)\)"):
        load_openai_state_dict(model, bad)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_openai_state_dict(model, [1, 2])


@pytest.mark.parametrize("filename", list(README_FLAGS))
def test_readme_flags_give_the_preset(filename):
    preset = presets.get(preset_for_openai_file(filename))
    flags = README_FLAGS[filename]
    assert unet_config_from_openai_flags(**flags) == preset.model
    assert diffusion_config_from_openai_flags(**flags) == preset.diffusion
    assert unet_config_from_openai_flags(**openai_flags(preset.model)) == preset.model


@pytest.mark.parametrize("filename", list(CLASSIFIER_FLAGS))
def test_classifier_flags_give_the_preset(filename):
    preset = presets.get(preset_for_openai_file(filename))
    assert classifier_config_from_openai_flags(**CLASSIFIER_FLAGS[filename]) == preset.model
    assert classifier_config_from_openai_flags(**openai_flags(preset.model)) == preset.model


def test_flag_parsing_and_defaults():
    # guided-diffusion's defaults: 64 px, 128 channels, attention at 16,8, 4 heads, no learned sigma.
    cfg = unet_config_from_openai_flags()
    assert (cfg.image_size, cfg.model_channels, cfg.attention_resolutions, cfg.num_heads) == (64, 128, (16, 8), 4)
    assert cfg.out_channels == 3 and cfg.num_classes is None and not cfg.resblock_updown
    assert cfg.channel_mult == (1, 2, 3, 4)
    cfg = unet_config_from_openai_flags(image_size="32", channel_mult="1,2,2", attention_resolutions="16",
                                        num_channels="64", class_cond="True", learn_sigma="true")
    assert (cfg.image_size, cfg.channel_mult, cfg.num_classes, cfg.out_channels) == (32, (1, 2, 2), 1000, 6)
    combined = {**README_FLAGS["256x256_diffusion.pt"], **CLASSIFIER_FLAGS["256x256_classifier.pt"],
                "classifier_scale": 1.0, "timestep_respacing": "250", "batch_size": 4}
    assert unet_config_from_openai_flags(**combined) == presets.get("adm256").model
    assert classifier_config_from_openai_flags(**combined) == presets.get("adm256-classifier").model
    with pytest.raises(ValueError, match=r"unknown guided-diffusion flag\(s\) \['num_chanels'\]"):
        unet_config_from_openai_flags(num_chanels=3)
    with pytest.raises(ValueError, match="flag class_cond must be a boolean"):
        unet_config_from_openai_flags(class_cond="maybe")
    with pytest.raises(ValueError, match="no default channel_mult for image_size=48"):
        unet_config_from_openai_flags(image_size=48)
    with pytest.raises(ValueError, match="rescale_timesteps"):
        diffusion_config_from_openai_flags(rescale_timesteps=True)


def test_builders_return_modules():
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                 num_head_channels=32, class_cond=True, learn_sigma=True)
    unet = unet_from_openai_flags(**flags)
    with torch.no_grad():
        assert unet(torch.randn(1, 3, 32, 32), torch.tensor([3]), torch.tensor([999])).shape == (1, 6, 32, 32)
    clf = classifier_from_openai_flags(image_size=32, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                                       classifier_attention_resolutions="16")
    assert clf.out[2].positional_embedding.shape == (64, 16 * 16 + 1)


def test_export_import_round_trip():
    torch.manual_seed(0)
    src = presets.build("tiny-unet")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    exported = to_openai_state_dict(src)
    assert list(exported) == list(src.state_dict())
    with torch.device("meta"):
        dst = presets.build("tiny-unet")
    load_openai_state_dict(dst, exported)
    assert not any(p.is_meta for p in dst.parameters())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 5])
    with torch.no_grad():
        torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)
    half = {k: v.half() for k, v in exported.items()}  # released files may hold fp16: cast to the model's dtype
    again = presets.build("tiny-unet")
    load_openai_state_dict(again, half)
    assert again.time_embed[0].weight.dtype == torch.float32


def test_preset_for_openai_file():
    assert preset_for_openai_file("256x256_diffusion.pt") == "adm256"
    assert preset_for_openai_file("/ckpt/dir/64_256_upsampler.pt") == "adm64-256-upsampler"
    assert preset_for_openai_file("256x256_diffusion_uncond.pt") == "adm256-uncond"
    with pytest.raises(ValueError, match="not a released guided-diffusion file"):
        preset_for_openai_file("model050000.pt")
