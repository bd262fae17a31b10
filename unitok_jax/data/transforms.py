"""Per-example image/caption transforms in PIL + numpy: robust decode, open_clip-style crops, caption cleaning.

Everything that can go wrong with a sample (unreadable bytes, absurd sizes, odd modes) surfaces as ``BadSample``
so the pipeline can drop and count it; nothing here knows about Grain, batching or tokenisation.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

# Anything larger is treated as a decompression bomb (8k x 8k). Checked from the header, before pixels are decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Smaller images carry no usable content (and 1x1 placeholders are common in web crawls).
DEFAULT_MIN_SIDE = 8
# Captions longer than this many characters are cut before tokenisation; no tokenizer context is anywhere near it.
MAX_CAPTION_CHARS = 4096
OPEN_CLIP_SCALE = (0.9, 1.0)
OPEN_CLIP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# PIL only refuses above 2 * MAX_IMAGE_PIXELS; we apply our own (lower) limit from the header instead.
Image.MAX_IMAGE_PIXELS = None


class BadSample(Exception):
    """A sample that cannot be used. ``reason`` is a short category for counting; ``detail`` is for logs."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB; transparency is composited on white (what a viewer would show)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grayscale: PIL's convert("RGB") clips at 255 instead of rescaling, so rescale by dtype range.
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if bad:  # inf/nan would set the rescaling range: the image would come out black or noise, silently
                raise BadSample("non-finite pixels", f"{bad} of {arr.size} float pixels are inf or nan")
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr.astype(np.int64)
            if arr.max() > 255 or mode.startswith("I;16"):
                arr = (
                    arr / 257.0
                    if arr.min() >= 0 and arr.max() <= 65535
                    else (arr - arr.min()) / max(1, np.ptp(arr)) * 255
                )
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decodes any PIL-readable image to uint8 RGB [h, w, 3]; raises ``BadSample`` for anything unusable."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise BadSample("missing image", f"got {type(data).__name__} of length {len(data) if data is not None else 0}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on e.g. palette transparency / EXIF oddities; not actionable
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("image too large", f"{w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_side:
                raise BadSample("image too small", f"{w}x{h}, min side {min_side}")
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # pylint: disable=broad-except  # a broken EXIF block must not cost the image
                pass
            img = _to_rgb(img)
            arr = np.asarray(img, dtype=np.uint8)
    except BadSample:
        raise
    except Exception as e:  # pylint: disable=broad-except  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise BadSample("undecodable image", f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < min_side:
        raise BadSample("undecodable image", f"decoded to shape {arr.shape}")
    return np.ascontiguousarray(arr)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = OPEN_CLIP_SCALE,
    ratio: tuple[float, float] = OPEN_CLIP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy Generator: returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest central crop with an in-range aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = OPEN_CLIP_SCALE,
    ratio: tuple[float, float] = OPEN_CLIP_RATIO,
) -> np.ndarray:
    """open_clip's train crop: RandomResizedCrop(size, scale, ratio, bicubic) on uint8 [h, w, 3] -> uint8 [s, s, 3]."""
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    img = Image.fromarray(image)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return np.asarray(out, dtype=np.uint8)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Eval transform: resize the shorter side to ``size`` (bicubic) and take the central ``size x size`` square.

    Done as one resample of the corresponding source box, which equals resize-then-crop up to sub-pixel rounding
    but never materialises the full resized image (cheap for extreme aspect ratios).
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) / 2.0, (width - side) / 2.0
    img = Image.fromarray(image)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    out = np.multiply(np.asarray(image), np.float32(1.0 / 127.5), dtype=np.float32)
    out -= np.float32(1.0)  # in place: one temporary less per image
    return out


def eval_transform(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes -> float32 [size, size, 3] in [-1, 1], shorter-side resize + center crop."""
    return to_float(resize_center_crop(decode_image(data), size))


def clean_caption(caption, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """Any caption value -> str: None -> "", bytes decoded with replacement, whitespace collapsed, length capped."""
    if caption is None:
        return ""
    if isinstance(caption, (bytes, bytearray, memoryview)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    elif not isinstance(caption, str):
        caption = str(caption)
    caption = caption[: max_chars * 2]  # bound the work of split() below on pathological inputs
    return " ".join(caption.split())[:max_chars]
