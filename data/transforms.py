"""ADM's ImageNet preprocessing, bit-identical to guided-diffusion, plus decoding and tensor output.

Facts carried over (ADM_SPEC §8): convert to RGB; while the short side is >= 2*S halve with a BOX
filter; BICUBIC-resize so the short side is S (each side rounded with Python's round); centre-crop
with floor offsets. The classifier instead draws the short side in [ceil(S/max_frac), ceil(S/min_frac)]
and takes a random crop. Images become float32 in [-1, 1] as `x / 127.5 - 1`.
"""
from __future__ import annotations

import functools
import io
import math
import random
from typing import Any

import numpy as np
from PIL import Image

# Pillow refuses images above ~179 Mpx by default ("decompression bomb"); ImageNet has none, but a
# custom dataset may, and those are legitimate inputs, so only guard against absurd sizes.
Image.MAX_IMAGE_PIXELS = 1 << 30


def _halve_while_large(pil_image: Image.Image, short_side: int) -> Image.Image:
    # BOX halving first, as ADM does: it both speeds up and antialiases the final BICUBIC step.
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    return pil_image


def _resize_short_side(pil_image: Image.Image, short_side: int) -> np.ndarray:
    pil_image = _halve_while_large(pil_image, short_side)
    scale = short_side / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    return np.asarray(pil_image)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: uint8 array [image_size, image_size, 3], bit-identical to guided-diffusion.

    The image is converted to RGB first if it is not already (ADM's loader does this before calling).
    """
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    arr = _resize_short_side(pil_image, image_size)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _randrange(rng: Any, start: int, stop: int | None = None) -> int:
    # Accept both random.Random (ADM uses the `random` module) and numpy Generators.
    if stop is None:
        start, stop = 0, start
    if hasattr(rng, "randrange"):
        return rng.randrange(start, stop)
    return int(rng.integers(start, stop))


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: Any = None,
) -> np.ndarray:
    """ADM's classifier augmentation: uint8 [image_size, image_size, 3] random crop.

    The short side is drawn uniformly from [ceil(S/max_crop_frac), ceil(S/min_crop_frac)], the image
    is resized as in `center_crop_arr`, and a crop is taken at a uniform position. `rng` is a
    `random.Random` or a `numpy.random.Generator` (default: a fresh unseeded `random.Random`);
    draws happen in ADM's order: short side, y, x.
    """
    if not 0 < min_crop_frac <= max_crop_frac <= 1:
        raise ValueError(
            f"crop fractions must satisfy 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}"
        )
    rng = random.Random() if rng is None else rng
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    short_side = _randrange(rng, smallest, largest + 1)
    arr = _resize_short_side(pil_image, short_side)
    crop_y = _randrange(rng, arr.shape[0] - image_size + 1)
    crop_x = _randrange(rng, arr.shape[1] - image_size + 1)
    return np.ascontiguousarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def maybe_flip(arr: np.ndarray, rng: Any) -> np.ndarray:
    """Mirror an HWC array left-right with probability 0.5 (ADM: `random() < 0.5`)."""
    u = rng.random() if hasattr(rng, "random") else float(rng.uniform())
    return np.ascontiguousarray(arr[:, ::-1]) if u < 0.5 else arr


def to_float_chw(arr: np.ndarray) -> np.ndarray:
    """uint8 HWC (or NHWC) -> float32 CHW (NCHW) in [-1, 1], computed as ADM does (`x / 127.5 - 1`)."""
    out = arr.astype(np.float32) / 127.5 - 1
    return np.ascontiguousarray(np.moveaxis(out, -1, -3))


def uint8_to_float(images: "Any") -> "Any":
    """uint8 NCHW tensor -> float32 in [-1, 1], the same numbers as `to_float_chw` (for GPU-side use)."""
    return images.float() / 127.5 - 1


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_simplejpeg(data: bytes) -> Image.Image | None:
    """libjpeg-turbo through simplejpeg: the same decoder Pillow wraps, without Pillow's overhead.

    Used only where it gives Pillow's pixels: baseline/progressive YCbCr or greyscale JPEGs that end
    with an EOI marker (simplejpeg decodes truncated data without complaint, Pillow refuses it; and
    its CMYK conversion differs from Pillow's). Everything else returns None and goes to Pillow.
    """
    sj = _simplejpeg()
    if sj is None or data[:2] != b"\xff\xd8" or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        if sj.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
            return None
        return Image.fromarray(sj.decode_jpeg(data, colorspace="RGB"), "RGB")
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def simplejpeg_matches_pillow() -> bool:
    """True if simplejpeg is installed and decodes a test JPEG to exactly Pillow's pixels."""
    if _simplejpeg() is None:
        return False
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 96 * 72 * 3).reshape(72, 96, 3)
    arr = (base + rng.normal(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    for subsampling in (0, 2):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90, subsampling=subsampling)
        ours = _decode_simplejpeg(buf.getvalue())
        theirs = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        if ours is None or not np.array_equal(np.asarray(ours), np.asarray(theirs)):
            return False
    return True


def decode_image(data: bytes, draft_size: int | None = None, decoder: str = "pil") -> Image.Image:
    """Decode image bytes to an RGB PIL image, fully loaded (so truncated files fail here).

    decoder "pil": Pillow. "simplejpeg": libjpeg-turbo via simplejpeg for ordinary JPEGs (same
    pixels as Pillow, ~2x faster), Pillow for the rest.
    `draft_size`: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT-domain downscale)
    while the short side stays >= draft_size. Faster, but NOT bit-identical to ADM's preprocessing;
    only used when asked for.
    """
    if data[:6] == b"\x93NUMPY":
        # Pre-resized shards in `npy` format: raw uint8 HxWx3 pixels.
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"an .npy image must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr, "RGB")
    if decoder == "simplejpeg" and draft_size is None:
        img = _decode_simplejpeg(data)
        if img is not None:
            return img
    img = Image.open(io.BytesIO(data))
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
