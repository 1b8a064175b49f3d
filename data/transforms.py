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
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image

# A 48 kB PNG can declare 20000x20000 pixels and cost 1.2 GB to decode (per worker). Images above
# this many pixels are refused before decoding: Pillow's own default bound (about 9459 x 9459, 268 MB
# as RGB), far above ImageNet's photos (a few megapixels; the largest are tens of megapixels). Pillow's
# global limit is left as it is; this check is ours and applies to every decoder used here.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image declares more than MAX_IMAGE_PIXELS pixels (refused before it is decoded)."""


def _too_large(pixels: int, size: str = "") -> ImageTooLarge:
    return ImageTooLarge(f"image too large: {size}{pixels:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
                         "(data.transforms.MAX_IMAGE_PIXELS)")


def check_image_size(width: int, height: int) -> None:
    """Raise ImageTooLarge when `width * height` exceeds MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(width * height, f"{width}x{height} = ")


def open_image(data: bytes) -> Image.Image:
    """`Image.open` of encoded bytes (lazy: only the header is read), refused when it is too large."""
    with warnings.catch_warnings():
        # Pillow warns (or, far above, raises) on its own at open time; one refusal, ours, is enough.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            found = re.search(r"\((\d+) pixels\)", str(err))
            raise _too_large(int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1) from None
    check_image_size(*img.size)
    return img


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
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            return None
    except ValueError:
        return None
    check_image_size(width, height)
    try:
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


def _read_npy_image(data: bytes) -> np.ndarray:
    """A uint8 HxWx3 `.npy` image, its header checked (shape, size, data length) before anything is allocated."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3 or fortran:
        raise ValueError(f"an .npy image must be uint8 HxWx3 in C order, got {dtype} {shape}")
    check_image_size(shape[1], shape[0])
    if buf.tell() + shape[0] * shape[1] * 3 != len(data):
        raise ValueError(f"an .npy image of shape {shape} needs {shape[0] * shape[1] * 3} bytes of data, "
                         f"the sample holds {len(data) - buf.tell()}")
    return np.frombuffer(data, dtype=np.uint8, offset=buf.tell()).reshape(shape)


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
        return Image.fromarray(_read_npy_image(data), "RGB")
    if decoder == "simplejpeg" and draft_size is None:
        img = _decode_simplejpeg(data)
        if img is not None:
            return img
    img = open_image(data)
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
