"""Our model file (weights + resolved preset) and load_model for our files, released files and runs."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import presets
from launch.model_io import (
    CHECKPOINT_DIR_ENV,
    FORMAT,
    load_model,
    load_model_file,
    resolve_openai_file,
    save_model_file,
)


@pytest.fixture(scope="module")
def trained():
    """tiny-unet with random (non-zero) weights and fixed inputs."""
    torch.manual_seed(0)
    model = presets.build("tiny-unet")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    inputs = (torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([3, 7]))
    return model.eval(), inputs


def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path, trained, suffix):
    model, inputs = trained
    preset = presets.get("tiny-unet", **{"diffusion.timestep_respacing": "25"})
    path = save_model_file(tmp_path / f"model{suffix}", model.state_dict(), preset, extra={"step": 12, "ema": 0.999})
    state, config, extra = load_model_file(path, expected=preset)
    assert config == preset.to_dict() and extra == {"step": 12, "ema": 0.999}
    assert list(state) == list(model.state_dict())
    loaded, loaded_preset = load_model(path, device="cpu")
    assert loaded_preset == preset and not loaded.training
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), rtol=0, atol=0)
    # the expected preset may differ in its respacing only (a sampling choice)
    load_model(path, preset="tiny-unet")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_refuses_a_different_config_listing_fields(tmp_path, trained):
    model, _ = trained
    path = save_model_file(tmp_path / "m.pt", model.state_dict(), presets.get("tiny-unet").to_dict())
    other = presets.get("tiny-unet", model_channels=64, num_res_blocks=2, **{"diffusion.noise_schedule": "cosine"})
    with pytest.raises(ValueError, match=r"3 field\(s\) differ") as err:
        load_model_file(path, expected=other)
    message = str(err.value)
    for text in ("diffusion.noise_schedule: file 'linear', expected 'cosine'",
                 "model.model_channels: file 32, expected 64", "model.num_res_blocks: file 1, expected 2"):
        assert text in message
    with pytest.raises(ValueError, match="model.type: file 'unet', expected 'classifier'"):
        load_model(path, preset="tiny-classifier")


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path, trained):
    model, _ = trained
    state = dict(model.state_dict())
    state.pop("out.2.bias")
    path = save_model_file(tmp_path / "m.safetensors", state, presets.get("tiny-unet"))
    with pytest.raises(ValueError, match=r"missing keys: out\.2\.bias"):
        load_model(path)


def test_bad_files(tmp_path, trained):
    model, _ = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_file(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="must end in .pt or .safetensors"):
        save_model_file(tmp_path / "m.bin", model.state_dict(), presets.get("tiny-unet"))
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    with pytest.raises(ValueError, match=f"not an {FORMAT} model file.*openai:"):
        load_model_file(raw)
    with pytest.raises(FileNotFoundError, match="neither a model file"):
        load_model(tmp_path / "missing.pt")


def test_openai_files(tmp_path, trained, monkeypatch):
    model, inputs = trained
    # A tiny model saved like a released file: a bare state dict with OpenAI's key names.
    released = tmp_path / "released" / "64x64_diffusion.pt"
    released.parent.mkdir()
    torch.save(model.state_dict(), released)
    loaded, preset = load_model(f"openai:{released}", preset="tiny-unet")
    assert preset.name == "tiny-unet"
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), rtol=0, atol=0)
    # The preset is inferred from the file name; here it is adm64, which the tiny weights do not fit.
    with pytest.raises(ValueError, match="missing keys: .*mis-shaped keys: time_embed.0.weight"):
        load_model(f"openai:{released}")
    # Found through the environment variable by file name alone.
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(released.parent))
    assert resolve_openai_file("64x64_diffusion.pt") == released
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"wget .*https://openaipublic\.blob\.core\.windows\.net/diffusion/jul-2021/256x256_classifier\.pt"):
        load_model("openai:256x256_classifier.pt")


def test_run_directory_is_delegated(tmp_path):
    pytest.importorskip("launch.train.checkpointing")
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path)):
        load_model(tmp_path)
