"""`adm export`: our model file and an OpenAI-format state dict that the original architecture loads
strictly; the released names and shapes for every preset; `--init-from openai:FILE` fine-tuning and
refusing another model's weights."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffusion_core import presets
from diffusion_core.openai_compat import classifier_from_openai_flags, openai_flags, unet_from_openai_flags
from launch.train.checkpointing import load_model_from_run
from launch.cli import main as adm
from launch.model_io import load_model_file
from tests.launch.test_train_data import digit_shards

# The repository's copy (tests/core/data) makes the check run on any clone; shared/ is the source.
KEYS_FILE = Path(__file__).resolve().parents[1] / "core" / "data" / "released_checkpoint_keys.txt"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def released_keys() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    out: dict[str, list] = {}
    current = None
    for line in KEYS_FILE.read_text().splitlines():
        head = re.match(r"### (\S+)", line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif current is not None and "\t" in line:
            name, shape = line.split("\t")
            current.append((name, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())))
    return out


@pytest.mark.skipif(not KEYS_FILE.is_file(), reason="needs tests/core/data/released_checkpoint_keys.txt")
@pytest.mark.parametrize("name", presets.names(include_small=False))
def test_export_layout_matches_the_released_file(name):
    preset = presets.get(name)
    with torch.device("meta"):
        module = preset.build()
    ours = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
    assert ours == released_keys()[preset.openai_file]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short single-process runs: a tiny UNet and a tiny classifier, both with ImageNet's 1000 classes
    (guided-diffusion's own constructors hard-code 1000)."""
    tmp = tmp_path_factory.mktemp("export")
    data = digit_shards(tmp / "digits", per_class=4, samples_per_shard=20)
    common = ["--data", str(data), "--set", "total_steps=2", "save_every=2", "log_every=1", "num_workers=0", "progress=false"]
    assert adm(["train", "--run-dir", str(tmp / "unet"), *common, "model.num_classes=1000", "ema_rates=0.9,0.99",
                "grad_accum=2", "timestep_sampler=loss-second-moment"]) == 0
    assert adm(["train-classifier", "--run-dir", str(tmp / "clf"), *common, "model.out_channels=1000"]) == 0
    return tmp, data


def test_exported_files_load_strictly_in_both_formats(runs):
    tmp, _ = runs
    run = tmp / "unet"
    assert adm(["export", str(run), "--ema-rate", "0.99"]) == 0
    sd_openai = torch.load(run / "export" / "model_openai.pt", weights_only=True)
    state, config, extra = load_model_file(run / "export" / "model.pt", expected=presets.get("tiny-unet", num_classes=1000))
    assert extra["step"] == 2 and extra["weights"] == "EMA 0.99"
    # The original architecture, built from guided-diffusion's own flags, takes the file strictly.
    preset = presets.get("tiny-unet", num_classes=1000)
    original = unet_from_openai_flags(**openai_flags(preset.model))
    original.load_state_dict(sd_openai, strict=True)
    module, run_preset = load_model_from_run(run, ema_rate=0.99)
    assert run_preset.name == "tiny-unet"
    assert all(torch.equal(module.state_dict()[k], sd_openai[k]) for k in sd_openai)
    assert all(torch.equal(state[k], sd_openai[k]) for k in sd_openai)
    # The other EMA and the raw weights differ from it.
    fast, _ = load_model_from_run(run, ema_rate=0.9)
    assert any(not torch.equal(fast.state_dict()[k], sd_openai[k]) for k in sd_openai)
    with pytest.raises(ValueError, match="no EMA at rate 0.5"):
        load_model_from_run(run, ema_rate=0.5)
    # A classifier run has no EMA: its trained weights are exported.
    assert adm(["export", str(tmp / "clf"), "--out", str(tmp / "clf_export")]) == 0
    clf_sd = torch.load(tmp / "clf_export" / "model_openai.pt", weights_only=True)
    clf = classifier_from_openai_flags(**openai_flags(presets.get("tiny-classifier", out_channels=1000).model))
    clf.load_state_dict(clf_sd, strict=True)


def test_init_from_openai_file_fine_tunes_and_refuses_other_models(runs, capsys):
    tmp, data = runs
    run = tmp / "unet"
    adm(["export", str(run)])
    source = torch.load(run / "export" / "model_openai.pt", weights_only=True)
    tuned = tmp / "tuned"
    common = ["--data", str(data), "--set", "total_steps=1", "save_every=1", "num_workers=0", "progress=false",
              "model.num_classes=1000", "lr=1e-12"]
    assert adm(["train", "--run-dir", str(tuned), "--init-from", f"openai:{run / 'export' / 'model_openai.pt'}", *common]) == 0
    adm(["export", str(tuned), "--no-ema", "--out", str(tmp / "tuned_export")])
    after = torch.load(tmp / "tuned_export" / "model_openai.pt", weights_only=True)
    assert max((after[k] - source[k]).abs().max().item() for k in source) < 1e-9
    # A released-format file of another architecture, and our file of another preset, are refused.
    capsys.readouterr()
    code = adm(["train", "--run-dir", str(tmp / "bad1"), "--init-from",
                f"openai:{tmp / 'clf_export' / 'model_openai.pt'}", *common])
    assert code == 2 and "does not fit" in capsys.readouterr().err
    assert not (tmp / "bad1").exists()  # a refused run writes nothing
    adm(["export", str(tmp / "clf")])
    code = adm(["train", "--run-dir", str(tmp / "bad2"), "--init-from", str(tmp / "clf" / "export" / "model.pt"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "different model than expected" in err and "model.type" in err
    assert not (tmp / "bad2").exists()


def test_resume_with_another_preset_names_the_fields(runs, capsys):
    tmp, data = runs
    code = adm(["train", "--run-dir", str(tmp / "unet"), "--data", str(data), "--set", "total_steps=3",
                "num_workers=0", "model.num_classes=1000", "ema_rates=0.9,0.99", "model.model_channels=64"])
    err = capsys.readouterr().err
    assert code == 2 and "preset.model.model_channels: 32 (saved) != 64 (now)" in err


def test_labels_beyond_the_model_are_refused(runs, capsys):
    tmp, data = runs
    code = adm(["train", "--run-dir", str(tmp / "five"), "--data", str(data), "--set", "model.num_classes=5",
                "num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "have 10 classes but preset tiny-unet has 5" in err and "model.num_classes=10" in err
    # Nothing was written, so the corrected command is not refused as "a different config".
    assert not (tmp / "five").exists()
    code = adm(["train", "--run-dir", str(tmp / "five"), "--data", str(data), "--set", "model.num_classes=10",
                "num_workers=0", "total_steps=1", "progress=false"])
    assert code == 0, capsys.readouterr().err
    assert (tmp / "five" / "checkpoints" / "step_000000001").is_dir()
