"""Training building blocks without processes: config resolution, run-directory checks, lr
schedule, precision checks, fp16 loss scaling on a real UNet, EMA, and the CLI's dry run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_core import presets
from launch.train import config as C
from launch.cli import main as adm
from runtime.distributed import DistInfo
from launch.train.ema import EMA, ema_name
from launch.precision import LossScaler, NonFiniteLossError, autocast, check_supported
from launch.train.strategies import TorchStrategy, deepspeed_config, deepspeed_sizes
from launch.train.loop import lr_at, prepare_run_dir


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def resolved(kind="diffusion", sets=(), file=None, **flags):
    cfg = C.build_config(kind, file=file, sets=list(sets), **flags)
    return C.resolve(cfg, require_data=False)


def test_preset_recipe_then_file_then_set(tmp_path):
    cfg, preset = resolved(preset="adm256")
    assert (cfg.batch_size, cfg.lr, cfg.total_steps, cfg.ema_rates) == (256, 1e-4, 1_980_000, (0.9999,))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 3.0e-4\nmodel:\n  dropout: 0.1\n  diffusion:\n    noise_schedule: cosine\n")
    cfg, preset = resolved(preset="adm256", file=yaml_file, sets=["lr=2e-4", "ema_rates=0.999,0.9999", "model.num_heads=8"])
    assert cfg.lr == 2e-4 and cfg.ema_rates == (0.999, 0.9999)  # --set wins over the file
    assert preset.model.dropout == 0.1 and preset.model.num_heads == 8
    assert preset.diffusion.noise_schedule == "cosine"
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('strategy = "fsdp"\nprecision = "bf16"\ngrad_accum = 4\n[model]\nmodel_channels = 64\n')
    cfg, preset = resolved(file=toml_file)
    assert (cfg.strategy, cfg.precision, cfg.grad_accum, preset.model.model_channels) == ("fsdp", "bf16", 4, 64)
    clf, _ = resolved("classifier", preset="adm64-classifier")
    assert (clf.lr, clf.weight_decay, clf.lr_schedule, clf.ema_rates) == (6e-4, 0.2, "linear", ())


@pytest.mark.parametrize("sets, message", [
    (["learning_rate=1"], "did you mean lr"),
    (["lr=abc"], "lr must be a number"),
    (["strategy=horovod"], "strategy='horovod' is not one of ddp, fsdp, deepspeed"),
    (["precision=fp8"], "precision='fp8'"),
    (["model.no_such_field=3"], "no_such_field"),
    (["ema_rates=1.5"], "EMA rates must lie in (0, 1)"),
    (["zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
    (["lr"], "--set expects key=value"),
])
def test_bad_overrides_name_the_problem(sets, message):
    with pytest.raises(ValueError, match=None) as err:
        resolved(sets=sets)
    assert message.lower() in str(err.value).lower()


def test_wrong_job_for_preset_and_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="train-classifier"):
        resolved(preset="tiny-classifier")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolved(file=tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="no training data"):
        C.resolve(C.build_config("diffusion"))


def test_resume_refuses_a_different_config_and_names_fields(tmp_path):
    cfg, preset = resolved(sets=["lr=1e-3"], data="shards")
    prepare_run_dir(tmp_path, C.resolved_dict(cfg, preset), rank=0)
    # Bookkeeping fields may change on resume...
    cfg2, preset2 = resolved(sets=["lr=1e-3", "total_steps=500", "log_every=7"], data="shards")
    prepare_run_dir(tmp_path, C.resolved_dict(cfg2, preset2), rank=0)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["total_steps"] == 500
    # ...the optimisation and the model may not.
    cfg3, preset3 = resolved(sets=["lr=2e-3", "model.model_channels=64"], data="shards")
    with pytest.raises(ValueError) as err:
        prepare_run_dir(tmp_path, C.resolved_dict(cfg3, preset3), rank=0)
    assert "train.lr: 0.001 (saved) != 0.002 (now)" in str(err.value)
    assert "preset.model.model_channels: 32 (saved) != 64 (now)" in str(err.value)


def test_lr_schedules():
    cfg, _ = resolved(sets=["lr=1.0", "total_steps=110", "warmup_steps=10", "lr_schedule=linear"])
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.5) and lr_at(cfg, 110) == 0.0
    cfg.lr_schedule = "cosine"
    assert lr_at(cfg, 60) == pytest.approx(0.5) and lr_at(cfg, 10) == pytest.approx(1.0)
    cfg.lr_schedule = "constant"
    assert lr_at(cfg, 100) == 1.0


def test_ema_halflife_in_images():
    cfg, _ = resolved(sets=["batch_size=256", "ema_halflife_kimg=500", "ema_rates=0.9999"])
    rates = C.ema_rates_of(cfg)
    # After half-life / batch steps an EMA keeps half of the old weights.
    assert rates[1] ** (500_000 / 256) == pytest.approx(0.5)


def test_unsupported_precision_is_a_clear_error(monkeypatch):
    check_supported("fp32", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision='fp8'"):
        check_supported("fp8", torch.device("cpu"))
    # A CPU without native bf16 (as on AVX2-only machines) refuses unless told to run slowly.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no native bf16.*allow_slow_precision=true"):
        check_supported("bf16", torch.device("cpu"))
    check_supported("bf16", torch.device("cpu"), allow_slow=True)


def _tiny_strategy(precision="fp16"):
    cfg, preset = resolved(sets=[f"precision={precision}", "allow_slow_precision=true", "lr=1e-3"])
    torch.manual_seed(0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return cfg, preset, TorchStrategy(cfg, preset.build(), info)


def _loss(strategy, precision, scale_by=1.0):
    x = torch.randn(2, 3, 16, 16)
    with autocast(precision, torch.device("cpu")):
        out = strategy.forward(x, torch.tensor([3, 500]), y=torch.tensor([1, 2]))
    return (out.float() - 1.0).pow(2).mean() * scale_by  # the output layer starts at zero


def test_fp16_loss_scaling_skips_overflow_halves_to_floor_and_stops():
    cfg, preset, strategy = _tiny_strategy("fp16")
    scaler = LossScaler(dynamic=True, init_scale=2.0 ** 4, floor=8.0, growth_interval=2, max_nonfinite=3)
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    # A finite step is applied; two in a row double the scale. (fp16 kernels are slow on CPUs: one
    # real fp16 step, then the scaler's bookkeeping on fp32 arithmetic, which it does not see.)
    for precision in ("fp16", "fp32"):
        strategy.backward(_loss(strategy, precision), scaler, 1)
        found_inf, norm = strategy.step(1e-3, scaler, grad_clip=0.0)
        assert isinstance(found_inf, torch.Tensor) and found_inf.item() == 0.0 and math.isfinite(norm.item())
    assert scaler.scale == 2.0 ** 5
    changed = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    # Overflowing gradients: the step is skipped on the device (weights and Adam's step count
    # untouched) and the scale halves, not below the floor.
    steps = [s["step"].item() for s in strategy.optimizer.state.values()]
    for expected in (2.0 ** 4, 2.0 ** 3):
        strategy.backward(_loss(strategy, "fp32", scale_by=float("inf")), scaler, 1)
        found_inf, _ = strategy.step(1e-3, scaler, grad_clip=1.0)
        assert found_inf.item() == 1.0 and scaler.scale == expected
    assert all(torch.equal(changed[k], v) for k, v in strategy.module.state_dict().items())
    assert [s["step"].item() for s in strategy.optimizer.state.values()] == steps
    state = scaler.state_dict()
    assert state["bad_in_a_row"] == 2 and state["skipped_total"] == 2
    scaler.check()  # 2 < max_nonfinite
    # The third bad step in a row is caught by the next check (the trainer checks when it logs).
    strategy.backward(_loss(strategy, "fp32", scale_by=float("nan")), scaler, 1)
    strategy.step(1e-3, scaler, grad_clip=0.0)
    strategy.backward(_loss(strategy, "fp32"), scaler, 1)
    assert strategy.step(1e-3, scaler, grad_clip=0.0)[0].item() == 0.0  # a good step ends the run of bad ones
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row had non-finite gradients.*at its floor"):
        scaler.check()
    assert scaler.scale == 8.0  # the floor
    scaler.check()  # the bad run was reported once; the good step reset it
    restored = LossScaler(dynamic=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_clipping_on_the_device_matches_clip_grad_norm():
    """Clipping folded into the fused optimizer's unscale equals torch's clip_grad_norm_ + step."""
    results = []
    for fold in (True, False):
        cfg, preset, strategy = _tiny_strategy("fp32")
        scaler = LossScaler(dynamic=True, init_scale=2.0 ** 3)
        torch.manual_seed(1)
        strategy.backward(_loss(strategy, "fp32", scale_by=1e3), scaler, 1)
        if fold:
            _, norm = strategy.step(1e-3, scaler, grad_clip=0.5)
        else:
            params = strategy.params
            for p in params:
                p.grad.div_(scaler.scale)
            norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
            strategy.optimizer.step()
        results.append((norm.item(), [p.detach().clone() for p in strategy.params]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5) and results[0][0] > 0.5
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_step_and_clipping():
    cfg, preset, strategy = _tiny_strategy("bf16")
    scaler = LossScaler(dynamic=False)
    x = torch.randn(2, 3, 16, 16)
    with autocast("bf16", torch.device("cpu")):
        out = strategy.forward(x, torch.tensor([3, 500]), y=torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in strategy.module.parameters())  # master weights stay fp32
    strategy.backward((out.float() - 1.0).pow(2).mean() * 1e4, scaler, 1)
    found_inf, norm = strategy.step(1e-3, scaler, grad_clip=0.5)
    assert found_inf.item() == 0.0 and norm.item() > 0.5


def test_ema_updates_each_rate_and_round_trips():
    torch.manual_seed(0)
    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = EMA(p, (0.9, 0.5))
    assert ema.names == [ema_name(0.9), ema_name(0.5)] == ["0.9", "0.5"]
    with torch.no_grad():
        p["w"].fill_(1.0)
    ema.update(p)
    ema.update(p, applied=torch.tensor(0.0))  # a skipped optimizer step leaves the EMA alone
    ema.update(p, applied=torch.tensor(1.0))
    assert torch.allclose(ema.shadows["0.9"]["w"], torch.full((3,), 1 - 0.9 ** 2))
    assert torch.allclose(ema.shadows["0.5"]["w"], torch.full((3,), 0.75))
    other = EMA(p, (0.9, 0.5))
    other.load_state_dict({k: {n: t.clone() for n, t in v.items()} for k, v in ema.state_dict().items()})
    assert torch.equal(other.shadows["0.5"]["w"], ema.shadows["0.5"]["w"])
    with pytest.raises(ValueError, match="no EMA at rate"):
        EMA(p, (0.99,)).load_state_dict(ema.state_dict())


def test_deepspeed_config_generated_and_user_override(tmp_path):
    cfg, _ = resolved(sets=["strategy=deepspeed", "zero_stage=3", "batch_size=64", "grad_accum=2",
                            "precision=fp16", "grad_clip=1.0"])
    ds = deepspeed_config(cfg, micro_batch=4, world_size=8, device_type="cuda")
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"] and ds["fp16"]["min_loss_scale"] == 1.0
    assert ds["gradient_clipping"] == 1.0
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    cfg.deepspeed_config = str(user)
    merged = deepspeed_config(cfg, 4, 8, "cuda")
    assert merged["zero_optimization"]["stage"] == 3 and merged["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    user.write_text(json.dumps({"train_batch_size": 1024}))
    with pytest.raises(ValueError, match="set batch_size / grad_accum"):
        deepspeed_config(cfg, 4, 8, "cuda")


def test_deepspeed_buckets_are_sized_to_the_model():
    with torch.device("meta"):
        numels = [p.numel() for p in presets.build("adm256").parameters()]
    gpu = deepspeed_sizes(numels, "cuda")
    assert gpu["reduce_bucket_size"] == gpu["allgather_bucket_size"] == -(-553_838_086 // 16)
    assert gpu["overlap_comm"] and gpu["contiguous_gradients"]
    assert gpu["stage3_param_persistence_threshold"] == 55_383
    tiny = deepspeed_sizes([1000, 73_728, 500], "cuda")
    assert tiny["reduce_bucket_size"] == 73_728  # never smaller than the largest tensor
    assert deepspeed_sizes([10 ** 6] * 10_000, "cuda")["reduce_bucket_size"] == 5 * 10 ** 8  # DeepSpeed's default at most
    cpu = deepspeed_sizes([1000, 73_728, 500], "cpu")
    assert cpu["reduce_bucket_size"] == 75_228 and not cpu["overlap_comm"]
    cfg, _ = resolved(sets=["strategy=deepspeed", "batch_size=8"])
    assert deepspeed_config(cfg, 4, 2, "cuda", numels)["zero_optimization"]["reduce_bucket_size"] == gpu["reduce_bucket_size"]


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert adm(["train", "--run-dir", str(tmp_path / "run"), "--preset", "adm64", "--dry-run",
                "--set", "lr=1e-4", "model.dropout=0.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["lr"] == 1e-4 and out["train"]["batch_size"] == 2048
    assert out["preset"]["name"] == "adm64" and out["preset"]["model"]["dropout"] == 0.0
    assert not (tmp_path / "run").exists()
    assert adm(["train-classifier", "--run-dir", str(tmp_path / "c"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "classifier"


def test_missing_and_empty_shards_fail_before_training(tmp_path, capsys):
    code = adm(["train", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = adm(["train", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "empty")])
    assert code == 2 and "holds neither manifest.json nor *.tar shards" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_presets_build_on_meta_for_the_flop_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in presets.build("adm64").parameters()) == 295_904_454
