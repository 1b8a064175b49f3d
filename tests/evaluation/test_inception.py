"""The FID Inception port: parameter layout of the released file, preprocessing, the three outputs."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import inception, weights
from evaluation.inception import FIDInception, preprocess, tf1_bilinear_resize


def test_state_dict_matches_released_file_layout():
    sd = FIDInception().state_dict()
    # 94 conv units x (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + fc.weight,
    # fc.bias = 472: the released file has no num_batches_tracked (94 x 6 + 2 would be 566).
    assert len(sd) == 472
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    assert sum(v.numel() for v in sd.values()) == 23_885_392
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert all(m.eps == 1e-3 for m in FIDInception().modules() if isinstance(m, inception.FrozenBatchNorm))


def test_strict_load_from_file_through_env(tmp_path, monkeypatch, random_inception):
    path = tmp_path / "w.pth"
    sd = random_inception.state_dict()
    torch.save(sd, path)
    monkeypatch.setenv(weights.ENV_VAR, str(path))
    loaded = weights.load_fid_inception(check_hash=False)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    # A state dict with num_batches_tracked (or any other extra key) is refused: loading is strict.
    sd = dict(sd)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FIDInception().load_state_dict(sd, strict=True)


def test_missing_weights_message_has_download_command(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    with pytest.raises(FileNotFoundError) as err:
        weights.resolve_inception_weights()
    message = str(err.value)
    assert weights.WEIGHTS_URL in message and "curl" in message
    assert str(tmp_path / "torchhome" / "hub" / "checkpoints" / weights.WEIGHTS_NAME) in message
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=weights.ENV_VAR):
        weights.resolve_inception_weights()


def test_weights_hash_checked_and_explicit_path_first(tmp_path, monkeypatch):
    bad = tmp_path / weights.WEIGHTS_NAME
    bad.write_bytes(b"not the weights")
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="sha256"):
        weights.resolve_inception_weights(bad)  # the explicit path wins over the env variable
    assert weights.resolve_inception_weights(bad, check_hash=False) == bad


def _tf_legacy_resize_oracle(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Direct loop transcription of TF1's ResizeBilinear (align_corners=False, legacy grid), HWC."""
    in_h, in_w = img.shape[:2]
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w) + img.shape[2:], np.float64)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0 = int(math.floor(fy)); y1 = min(y0 + 1, in_h - 1); ly = float(fy) - y0
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0 = int(math.floor(fx)); x1 = min(x0 + 1, in_w - 1); lx = float(fx) - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


def test_resize_hand_worked_2x2_to_4x4():
    x = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    # Source coordinates 0, .5, 1, 1.5 per axis: the last row/column repeat the edge (no half-pixel shift).
    expected = torch.tensor([[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]], dtype=torch.float32)
    torch.testing.assert_close(tf1_bilinear_resize(x, 4)[0, 0], expected)
    # Not what the usual half-pixel bilinear (align_corners=False) gives:
    assert not torch.allclose(F.interpolate(x, size=4, mode="bilinear", align_corners=False)[0, 0], expected)


@pytest.mark.parametrize("shape,size", [((5, 7), (3, 11)), ((64, 64), (299, 299)), ((300, 256), (299, 299)), ((3, 2), (8, 5))])
def test_resize_matches_numpy_oracle(shape, size):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, shape + (3,)).astype(np.float32)
    ours = tf1_bilinear_resize(torch.from_numpy(img).permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, _tf_legacy_resize_oracle(img.astype(np.float64), *size), rtol=0, atol=2e-4)


def test_resize_accepts_uint8_numpy_and_rejects_bad_rank():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    assert tf1_bilinear_resize(x, 8).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="NCHW"):
        tf1_bilinear_resize(np.zeros((4, 4)), 8)


def test_preprocess_is_resize_then_centre_at_128():
    x = torch.randint(0, 256, (2, 37, 45, 3), dtype=torch.uint8)
    expected = (tf1_bilinear_resize(x.permute(0, 3, 1, 2).float(), 299) - 128) / 128
    torch.testing.assert_close(preprocess(x), expected)
    full = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)
    torch.testing.assert_close(preprocess(full), (full.permute(0, 3, 1, 2).float() - 128) / 128)
    with pytest.raises(ValueError, match="NHWC"):
        preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("size", [64, 128, 256, 299, 512])
def test_output_shapes_for_every_resolution(_inception_master, size):
    x = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8)
    out = _inception_master(x)
    assert out.pool.shape == (1, 2048) and out.spatial.shape == (1, 2023) and out.logits.shape == (1, 1008)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.fixture(scope="module")
def probe(_inception_master):
    """One forward pass of 3 images with Mixed_6d.branch1x1's output captured."""
    captured = {}
    handle = _inception_master.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("act", o))
    out = _inception_master(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8))
    handle.remove()
    return _inception_master, out, captured["act"]


def test_features_are_not_trivial(probe):
    _, out, _ = probe
    for t in out:
        assert t.std(0).mean() > 1e-3 * t.abs().mean()  # features change with the image
    assert (out.pool >= 0).all() and (out.spatial >= 0).all()  # both read after a ReLU


def test_spatial_features_are_flattened_nhwc(probe):
    _, out, act = probe
    assert act.shape == (3, 192, 17, 17)
    for h, w, c in [(0, 0, 1), (3, 5, 6), (16, 16, 0), (7, 2, 4)]:
        torch.testing.assert_close(out.spatial[:, (h * 17 + w) * 7 + c], act[:, c, h, w])
    nchw = act[:, :7].flatten(1)
    assert not torch.allclose(out.spatial, nchw)


def test_logits_skip_the_fc_bias(probe):
    model, out, _ = probe
    assert model.fc.bias.abs().min() > 0
    torch.testing.assert_close(out.logits, out.pool @ model.fc.weight.T)
    assert not torch.allclose(out.logits, model.fc(out.pool))


def test_tf_pool_variants():
    # Average pools exclude padding (TF): a constant map stays constant up to the border.
    ones = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(inception._tf_avg_pool(ones), ones)
    # The last block max-pools in its pool branch, the one before averages.
    model = FIDInception()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
    block = model.Mixed_7c
    for unit in block.modules():
        if isinstance(unit, inception.ConvUnit):
            unit.conv.weight.normal_()
    x = torch.randn(1, 2048, 8, 8)
    expected = block.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1))
    torch.testing.assert_close(block(x)[:, -192:], expected)


def test_batch_invariance(_inception_master):
    x = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    together = _inception_master(x)
    for i in range(2):
        alone = _inception_master(x[i:i + 1])
        for a, b in zip(together, alone):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-4, atol=1e-4)


def _real_weights():
    try:
        return weights.resolve_inception_weights()
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.skipif(_real_weights() is None, reason="FID Inception weights not present (see docs/evaluation.md)")
def test_golden_real_weights_load_and_run():
    model = weights.load_fid_inception()
    out = model(torch.full((2, 64, 64, 3), 128, dtype=torch.uint8))
    assert all(torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out.pool[0], out.pool[1])


@pytest.mark.slow
@pytest.mark.skipif(_real_weights() is None or not os.environ.get("ADM_GOLDEN_SAMPLES")
                    or not os.environ.get("ADM_GOLDEN_REFERENCE"),
                    reason="needs the weights, ADM_GOLDEN_SAMPLES (ADM-G+ADM-U 256 samples) and "
                           "ADM_GOLDEN_REFERENCE (VIRTUAL_imagenet256_labeled.npz)")
def test_golden_published_256_batch():
    from evaluation.evaluate import evaluate

    m = evaluate(os.environ["ADM_GOLDEN_REFERENCE"], os.environ["ADM_GOLDEN_SAMPLES"], progress=False)["metrics"]
    assert abs(m["fid"] - 3.9426) < 2e-3 and abs(m["sfid"] - 6.1404) < 5e-3
    assert abs(m["inception_score"] - 215.84) < 0.1
    assert abs(m["precision"] - 0.8265) < 2e-3 and abs(m["recall"] - 0.5309) < 2e-3
