"""`adm train-classifier` on real digits (10 classes): noisy inputs at uniform t, random crops,
linear lr decay, validation shards; accuracy must end well above chance (10 %)."""
from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.cli import main as adm
from launch.train.config import build_config, resolve
from launch.train.loop import lr_at
from tests.launch.test_train_data import digit_shards

pytestmark = pytest.mark.slow


def test_noisy_classifier_learns_digits(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread avoids OpenMP spin-waiting
    try:
        train = digit_shards(tmp_path / "train", per_class=50, samples_per_shard=50)
        val = digit_shards(tmp_path / "val", split="val", per_class=8, samples_per_shard=40)
        run = tmp_path / "run"
        code = adm(["train-classifier", "--run-dir", str(run), "--data", str(train), "--val-data", str(val),
                    "--set", "total_steps=200", "batch_size=32", "lr=1e-2", "warmup_steps=20", "log_every=40",
                    "save_every=100", "num_workers=0", "eval_every=100", "progress=false",
                    "random_flip=false"])  # digits are not mirror-symmetric
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/acc@1", "train/acc@5", "train/acc@1_q0", "train/acc@5_q3", "val/acc@1",
                "val/acc@1_q0", "val/loss_q3", "train/lr", "train/grad_norm"):
        assert tag in scalars, tag
    val_acc = {e.step: e.value for e in acc.Scalars("val/acc@1")}
    assert sorted(val_acc) == [100, 200]
    # Chance is 0.1; the least noisy quarter of timesteps is far easier than the average.
    assert val_acc[200] >= 0.25, val_acc
    assert acc.Scalars("val/acc@1_q0")[-1].value >= 0.4
    assert acc.Scalars("train/acc@5")[-1].value > 0.6
    # Linear decay to zero, after warm-up; no EMA by default.
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lrs[200] < 1e-4 and lrs[40] > lrs[160]
    meta = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("meta.json").read_text())
    assert meta["ema_names"] == [] and meta["kind"] == "classifier"


def test_classifier_linear_decay_matches_the_recipe():
    cfg, preset = resolve(build_config("classifier", preset="adm128-classifier", data="x"))
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.total_steps) == (3e-4, 0.05, 256, 300_000)
    assert lr_at(cfg, 0) == pytest.approx(3e-4) and lr_at(cfg, 150_000) == pytest.approx(1.5e-4)
    assert preset.diffusion.noise_schedule == "linear"
