"""ADM's preprocessing against an independent implementation written here from ADM_SPEC §8."""
from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.miniature import miniature_files
from data.transforms import (
    center_crop_arr,
    decode_image,
    maybe_flip,
    random_crop_arr,
    simplejpeg_matches_pillow,
    to_float_chw,
    uint8_to_float,
)


def _reference_resize(img: Image.Image, short: int, rounding=round) -> Image.Image:
    """Spec: BOX-halve while the short side is >= 2*short, then BICUBIC so the short side is `short`."""
    w, h = img.size
    while w >= 2 * short and h >= 2 * short:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    scale = short / min(w, h)
    return img.resize((rounding(w * scale), rounding(h * scale)), Image.BICUBIC)


def reference_center_crop(img: Image.Image, size: int, rounding=round) -> np.ndarray:
    img = _reference_resize(img.convert("RGB"), size, rounding)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


def reference_random_crop(img: Image.Image, size: int, rng: random.Random, lo=0.8, hi=1.0) -> np.ndarray:
    short = rng.randrange(math.ceil(size / hi), math.ceil(size / lo) + 1)
    img = _reference_resize(img.convert("RGB"), short)
    w, h = img.size
    top = rng.randrange(h - size + 1)
    left = rng.randrange(w - size + 1)
    return np.array(img.crop((left, top, left + size, top + size)))


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth random colour field with edges: exercises the BOX and BICUBIC filters."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    arr = np.array(img)
    arr[h // 3 : h // 2, :] = 255 - arr[h // 3 : h // 2, :]
    return Image.fromarray(arr)


SIZES = [(500, 375), (375, 500), (517, 389), (64, 64), (63, 200), (1024, 1023), (129, 97), (80, 300)]


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("size", [32, 64])
def test_center_crop_matches_reference(w, h, size):
    img = _photo(w, h, seed=w * h)
    out = center_crop_arr(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_center_crop(img, size))


def test_center_crop_rounds_ties_to_even():
    # 14x12 at S=9: scale 0.75, width 10.5 -> Python's round gives 10 (half-up would give 11).
    img = _photo(14, 12, seed=1)
    out = center_crop_arr(img, 9)
    np.testing.assert_array_equal(out, reference_center_crop(img, 9))
    half_up = reference_center_crop(img, 9, rounding=lambda x: math.floor(x + 0.5))
    assert not np.array_equal(out, half_up)


def test_center_crop_converts_modes_like_adm():
    img = _photo(300, 200, seed=2)
    for mode in ("L", "CMYK", "RGBA", "P"):
        converted = img.convert(mode)
        np.testing.assert_array_equal(center_crop_arr(converted, 64), reference_center_crop(converted.convert("RGB"), 64))


@pytest.mark.parametrize("seed", range(6))
def test_random_crop_matches_reference(seed):
    img = _photo(*SIZES[seed], seed=seed)
    out = random_crop_arr(img, 64, rng=random.Random(seed))
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, reference_random_crop(img, 64, random.Random(seed)))


def test_random_crop_accepts_numpy_generator_and_checks_fractions():
    img = _photo(300, 200, seed=3)
    a = random_crop_arr(img, 32, rng=np.random.default_rng(5))
    b = random_crop_arr(img, 32, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="min_crop_frac"):
        random_crop_arr(img, 32, min_crop_frac=0.9, max_crop_frac=0.5)


def test_flip_and_float_conversion():
    arr = center_crop_arr(_photo(200, 150, seed=4), 32)
    flips = [maybe_flip(arr, random.Random(s)) for s in range(20)]
    assert any(np.array_equal(f, arr) for f in flips)
    assert any(np.array_equal(f, arr[:, ::-1]) for f in flips)
    assert all(np.array_equal(f, arr) or np.array_equal(f, arr[:, ::-1]) for f in flips)
    x = to_float_chw(arr)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    expected = np.transpose(arr.astype(np.float32) / 127.5 - 1, (2, 0, 1))
    np.testing.assert_array_equal(x, expected)
    assert x.min() >= -1 and x.max() <= 1
    # GPU-side normalisation gives the very same numbers.
    u8 = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    assert torch.equal(uint8_to_float(u8), torch.from_numpy(x))


def test_decode_image_real_files_to_rgb():
    files = miniature_files(num_classes=4, per_class=1)
    for entries in files.values():
        for name, data in entries.items():
            if name.endswith("_9002.JPEG") or name.endswith(".txt"):
                with pytest.raises(Exception):
                    decode_image(data)
                continue
            img = decode_image(data)
            assert img.mode == "RGB"
            expected = Image.open(io.BytesIO(data))
            expected.load()
            np.testing.assert_array_equal(np.asarray(img), np.asarray(expected.convert("RGB")))


@pytest.mark.skipif(not simplejpeg_matches_pillow(), reason="simplejpeg is not installed")
def test_simplejpeg_decoder_gives_pillows_pixels():
    cases = []
    for i, (w, h) in enumerate(SIZES[:5]):
        for kwargs in ({"quality": 90}, {"quality": 75, "subsampling": 0}, {"quality": 95, "progressive": True}):
            buf = io.BytesIO()
            _photo(w, h, seed=i).save(buf, format="JPEG", **kwargs)
            cases.append(buf.getvalue())
    for entries in miniature_files(num_classes=4, per_class=1).values():
        cases += [data for name, data in entries.items() if not name.endswith((".txt", "_9002.JPEG"))]
    for data in cases:  # ordinary, progressive, 4:4:4, greyscale, CMYK (Pillow fallback), PNG, RGBA
        fast = decode_image(data, decoder="simplejpeg")
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(decode_image(data, decoder="pil")))
    truncated = miniature_files(num_classes=1, per_class=1)["n01440764"]["n01440764_9002.JPEG"]
    with pytest.raises(OSError, match="truncated"):
        decode_image(truncated, decoder="simplejpeg")  # simplejpeg would accept it; Pillow refuses
