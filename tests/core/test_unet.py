"""The ADM networks against the spec (ADM_SPEC section 6), written independently of our modules."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from diffusion_core import presets
from diffusion_core.nn_blocks import AttentionBlock, timestep_embedding
from diffusion_core.unet import (
    ClassifierConfig,
    EncoderUNet,
    UNetConfig,
    UNetModel,
    build_model,
    config_from_dict,
    config_to_dict,
)


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every weight (including the zero-initialised ones) with random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def tiny_unet(**kw) -> UNetModel:
    base = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                attention_resolutions=(8,), num_head_channels=32, num_classes=10)
    return UNetModel(UNetConfig(**{**base, **kw}))


# ---------------------------------------------------------------- timestep embedding

@pytest.mark.parametrize("dim", [32, 33, 7])
def test_timestep_embedding_matches_formula(dim):
    t = np.array([0.0, 1.0, 17.0, 999.0])
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)
    got = timestep_embedding(torch.tensor(t), dim)
    assert got.shape == (4, dim) and got.dtype == torch.float32
    # float32 arguments (as in the original) at t=999 round to ~1e-4 absolute.
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4)
    if dim % 2:
        assert torch.all(got[:, -1] == 0)


# ---------------------------------------------------------------- attention, both qkv orders

def reference_attention_block(block: AttentionBlock, x: torch.Tensor, new_order: bool) -> torch.Tensor:
    """The spec's attention block in float64 einsums: GN, 1x1 qkv, heads, softmax(qk/sqrt d) v, 1x1 out.

    legacy order: the 3C qkv channels are grouped per head, each head holding its q, k, v.
    new order: the channels hold all q, then all k, then all v; each splits into heads.
    """
    b, c, hgt, wid = x.shape
    heads = block.num_heads
    d = c // heads
    x64 = x.double().reshape(b, c, -1)
    normed = F.group_norm(x64, 32, block.norm.weight.double(), block.norm.bias.double(), 1e-5)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight.double()[:, :, 0], normed) + block.qkv.bias.double()[:, None]
    outs = []
    for h in range(heads):
        if new_order:
            q, k, v = (qkv[:, j * c + h * d: j * c + (h + 1) * d] for j in range(3))
        else:
            chunk = qkv[:, h * 3 * d:(h + 1) * 3 * d]
            q, k, v = chunk[:, :d], chunk[:, d:2 * d], chunk[:, 2 * d:]
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", w, v))
    a = torch.cat(outs, dim=1)
    out = torch.einsum("oc,bct->bot", block.proj_out.weight.double()[:, :, 0], a) + block.proj_out.bias.double()[:, None]
    return (x64 + out).reshape(b, c, hgt, wid)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "original"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_reference(new_order, impl, channels_last):
    block = randomise(AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order), seed=1)
    block.impl = impl
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = block(x)
    ref = reference_attention_block(block, x, new_order)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_qkv_orders_are_not_interchangeable():
    legacy = randomise(AttentionBlock(64, num_head_channels=16, use_new_attention_order=False), seed=3)
    new = AttentionBlock(64, num_head_channels=16, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert (legacy(x) - new(x)).abs().max() > 1e-2


def test_attention_heads_fixed_count_and_per_head_channels():
    assert AttentionBlock(256, num_heads=4).num_heads == 4
    assert AttentionBlock(256, num_head_channels=64).num_heads == 4
    with pytest.raises(ValueError, match="num_head_channels=48 does not divide 64"):
        AttentionBlock(64, num_head_channels=48)
    with pytest.raises(ValueError, match="num_heads=3 does not divide 64"):
        AttentionBlock(64, num_heads=3)


# ---------------------------------------------------------------- whole networks

SMALL = ["tiny-unet", "tiny-classifier", "tiny-upsampler", "demo-unet", "demo-unet-cond", "demo-classifier"]


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_output_shapes(name):
    torch.manual_seed(0)
    model = randomise(presets.build(name))
    cfg = model.config
    n = 2
    x = torch.randn(n, 3, cfg.image_size, cfg.image_size)
    t = torch.tensor([0, 999])
    kw = {}
    if isinstance(cfg, UNetConfig):
        if cfg.num_classes:
            kw["y"] = torch.tensor([0, cfg.num_classes - 1])
        if cfg.super_resolution:
            kw["low_res"] = torch.randn(n, 3, cfg.low_res_size, cfg.low_res_size)
        expected = (n, cfg.out_channels, cfg.image_size, cfg.image_size)
    else:
        expected = (n, cfg.out_channels)
    with torch.no_grad():
        out = model(x, t, **kw)
    assert out.shape == expected and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0


def test_zero_initialised_output_and_residual_branches():
    model = presets.build("tiny-unet")
    for name, p in model.named_parameters():
        if name.startswith("out.2") or name.endswith("out_layers.3.weight") or ".proj_out." in name:
            assert not p.any(), name
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.all(model(x, torch.tensor([1, 2]), torch.tensor([0, 1])) == 0)


def test_unet_agrees_across_memory_formats_and_attention_impls():
    model = randomise(tiny_unet(), seed=4, std=0.05)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 9])
    outs = []
    for fmt, impl in [("channels_last", "sdpa"), ("contiguous", "sdpa"), ("contiguous", "original")]:
        model.set_memory_format(fmt)
        model.set_attention_impl(impl)
        with torch.no_grad():
            outs.append(model(x, t, y))
        assert outs[-1].is_contiguous()
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-4)


def test_use_checkpoint_gives_identical_gradients():
    # Dropout is on: non-reentrant checkpointing must replay the same dropout masks.
    plain = randomise(tiny_unet(dropout=0.2), seed=5, std=0.05)
    ckpt = tiny_unet(dropout=0.2, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.tensor([2, 3])
    grads = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)
        model(x, t, y).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_follows_the_flag_only(monkeypatch):
    import diffusion_core.nn_blocks as blocks

    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.tensor([1])
    tiny_unet()(x, t, y).sum().backward()
    assert calls == []  # the original recomputed attention even without the flag
    model = tiny_unet(use_checkpoint=True)
    model(x, t, y).sum().backward()
    n_blocks = sum(isinstance(m, (blocks.ResBlock, blocks.AttentionBlock)) for m in model.modules())
    assert len(calls) == n_blocks
    calls.clear()
    with torch.no_grad():
        model(x, t, y)
    assert calls == []


def test_super_resolution_concatenates_bilinear_upsampling():
    sr = randomise(tiny_unet(super_resolution=True, low_res_size=8), seed=6, std=0.05)
    plain = tiny_unet(in_channels=6)
    plain.load_state_dict(sr.state_dict())
    x, low, t, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(sr(x, t, y, low_res=low), plain(torch.cat([x, up], 1), t, y))
    with pytest.raises(ValueError, match="low_res"):
        sr(x, t, y)
    with pytest.raises(ValueError, match="low_res must be 8x8"):
        sr(x, t, y, low_res=torch.randn(2, 3, 4, 4))


def test_null_class_is_the_extra_label():
    model = randomise(tiny_unet(null_class=True), seed=7)
    assert model.label_emb.weight.shape[0] == 11
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
        assert (model(x, t) - model(x, t, torch.tensor([3, 3]))).abs().max() > 1e-3


# ---------------------------------------------------------------- classifier

def reference_attention_pool(pool, h: torch.Tensor) -> torch.Tensor:
    """Spec: mean token prepended, positions added, full multi-head attention (new order), token 0 out."""
    b, c = h.shape[:2]
    tokens = h.double().reshape(b, c, -1)
    tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], -1) + pool.positional_embedding.double()[None]
    qkv = torch.einsum("oc,bct->bot", pool.qkv_proj.weight.double()[:, :, 0], tokens) + pool.qkv_proj.bias.double()[:, None]
    heads, d = pool.num_heads, c // pool.num_heads
    outs = []
    for i in range(heads):
        q, k, v = (qkv[:, j * c + i * d: j * c + (i + 1) * d] for j in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), -1)
        outs.append(torch.einsum("bts,bcs->bct", w, v))
    a = torch.cat(outs, 1)
    out = torch.einsum("oc,bct->bot", pool.c_proj.weight.double()[:, :, 0], a) + pool.c_proj.bias.double()[:, None]
    return out[:, :, 0]


@pytest.mark.parametrize("impl", ["sdpa", "original"])
def test_attention_pool_matches_reference(impl):
    clf = randomise(presets.build("tiny-classifier"), seed=8, std=0.05)
    pool = clf.out[2]
    assert pool.positional_embedding.shape == (64, 8 * 8 + 1)
    pool.impl = impl
    h = torch.randn(3, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pool(h).double(), reference_attention_pool(pool, h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_classifier_pools(pool):
    cfg = ClassifierConfig(image_size=16, num_res_blocks=1, model_channels=32, channel_mult=(1, 2),
                           attention_resolutions=(8,), num_head_channels=32, out_channels=7, pool=pool)
    clf = randomise(EncoderUNet(cfg), seed=9, std=0.05)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = clf(x, torch.tensor([0, 500]))
    assert logits.shape == (2, 7)
    logits[:, 3].sum().backward()
    assert x.grad.abs().sum() > 0  # guidance needs d logits / d x
    if pool == "spatial":
        # the head reads the mean of every input block and of the middle block: 32*3 + 64*3 (+ middle 64)
        assert clf.out[0].in_features == 32 + 32 + 32 + 64 + 64
    if pool == "adaptive":
        with torch.no_grad():
            assert clf(torch.randn(2, 3, 32, 32), torch.tensor([1, 1])).shape == (2, 7)


def test_attention_pool_classifier_needs_its_image_size():
    clf = presets.build("tiny-classifier")
    with pytest.raises(ValueError, match="16x16"):
        clf(torch.randn(1, 3, 32, 32), torch.tensor([1]))


# ---------------------------------------------------------------- reduced precision

class DtypeRecorder(TorchFunctionMode):
    """Records the input dtype of every group_norm, softmax and SDPA call."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("group_norm", "softmax", "scaled_dot_product_attention"):
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def _micro_unet(**kw) -> UNetModel:
    # One level at 8 px: bf16 matmuls are ~100x slower than fp32 on this CPU.
    return randomise(UNetModel(UNetConfig(image_size=8, model_channels=32, num_res_blocks=1, channel_mult=(1,),
                                          attention_resolutions=(8,), num_head_channels=16, **kw)), seed=10, std=0.05)


@pytest.mark.parametrize("impl", ["sdpa", "original"])
def test_bf16_autocast_keeps_groupnorm_and_softmax_in_float32(impl):
    model = _micro_unet()
    model.set_attention_impl(impl)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        ref = model(x, t)
        with DtypeRecorder() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    norms = [dt for name, dt in rec.seen if name == "group_norm"]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert set(norms) == {torch.float32}
    n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
    if impl == "original":
        assert [dt for name, dt in rec.seen if name == "softmax"] == [torch.float32] * n_attn
    else:  # fused kernels take bf16 q, k, v and accumulate the softmax in float32 internally
        assert [dt for name, dt in rec.seen if name == "scaled_dot_product_attention"] == [torch.bfloat16] * n_attn
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_groupnorm_in_float32_for_a_converted_module():
    model = _micro_unet().to(torch.bfloat16)
    with DtypeRecorder() as rec, torch.no_grad():
        out = model(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16), torch.tensor([3]))
    assert out.dtype == torch.bfloat16
    assert {dt for name, dt in rec.seen if name == "group_norm"} == {torch.float32}


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(attention_resolutions=(4,)), r"attention resolution\(s\) \[4\] not in the pyramid \[16, 8\]"),
        (dict(image_size=18, channel_mult=(1, 2, 2)), r"image_size=18 is not divisible by 2\^2 = 4"),
        (dict(num_head_channels=24), "num_head_channels=24 does not divide"),
        (dict(num_head_channels=-1, num_heads=3), "num_heads=3 does not divide"),
        (dict(model_channels=48), "not a multiple of 32"),
        (dict(image_size=40, channel_mult=None), "no default channel_mult for image_size=40"),
        (dict(null_class=True, num_classes=None), "null_class=True needs num_classes"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_unet_config(kw, message):
    base = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                attention_resolutions=(8,), num_head_channels=32, num_classes=10)
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**base, **kw})


def test_bad_classifier_config():
    with pytest.raises(ValueError, match="pool='max'"):
        ClassifierConfig(image_size=16, num_res_blocks=1, model_channels=32, channel_mult=(1, 2), pool="max")
    with pytest.raises(ValueError, match="attention pool needs num_head_channels"):
        ClassifierConfig(image_size=16, num_res_blocks=1, model_channels=32, channel_mult=(1, 2), num_head_channels=-1)


def test_bad_inputs():
    model = tiny_unet()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"label 10 out of range: labels must be in \[0, 10\)"):
        model(x, t, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="label -1 out of range"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="pass labels y"):
        model(x, t)
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[2\]"):
        model(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match=r"timesteps must have shape \[2\]"):
        model(x, torch.tensor([[1], [2]]), y)
    with pytest.raises(ValueError, match="channels, the model expects 3"):
        model(torch.randn(2, 1, 16, 16), t, y)
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(2, 3, 15, 15), t, y)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(num_classes=None)(x, t, y)
    with torch.no_grad():  # a scalar timestep is broadcast; other square sizes work (fully convolutional)
        assert model(x, torch.tensor(5), y).shape == (2, 6, 16, 16)
        assert model(torch.randn(2, 3, 32, 32), t, y).shape == (2, 6, 32, 32)


def test_config_dict_round_trip():
    for name in presets.names():
        cfg = presets.get(name).model
        d = config_to_dict(cfg)
        assert d["type"] in ("unet", "classifier")
        assert config_from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="unknown unet config field"):
        config_from_dict({**config_to_dict(presets.get("tiny-unet").model), "width": 3})
    with pytest.raises(ValueError, match="needs a UNetConfig or ClassifierConfig"):
        build_model({"type": "unet"})
