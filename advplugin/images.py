"""Decoding untrusted images with bounded cost.

Uploads and folders may hold anything: decompression bombs, truncated files, CMYK or
16-bit images. Everything is decoded here, once, to RGB uint8 (16-bit samples scaled, not
clipped), with a pixel limit checked before the pixels are decoded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """The input is not a usable image; the message says why (never echoes content)."""


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a file path or encoded bytes to an RGB uint8 array [H, W, 3]."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(Path(source), "rb")
    except OSError as e:
        raise ImageError(f"cannot open image: {e.strerror}") from None
    with stream:
        try:
            with Image.open(stream) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image has {w}x{h} pixels, more than the limit of {max_pixels}"
                    )
                img.load()
                rgb = _to_rgb(img)
        except UnidentifiedImageError:
            raise ImageError("not a recognised image format") from None
        except (OSError, SyntaxError) as e:
            raise ImageError(f"image is truncated or corrupt ({type(e).__name__})") from None
        except Image.DecompressionBombError:
            raise ImageError("image exceeds the decompression limit") from None
    return np.asarray(rgb, dtype=np.uint8)


#: Modes holding more than 8 bits per sample, which Pillow's convert("RGB") clips instead of
#: scaling: a 16-bit grayscale PNG of a face came out almost white (mean 234 instead of 60)
#: and no face was found.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per sample; 16-bit grayscale (and 32-bit integer, read as 16-bit
    samples, as PNG and TIFF store them) scaled by 255/65535 rather than clipped."""
    if img.mode not in _WIDE_GRAY_MODES:
        return img.convert("RGB")
    wide = np.asarray(img).astype(np.int64)
    if img.mode == "I" and wide.max(initial=0) <= 255:  # integer mode holding 8-bit values
        gray = wide
    else:
        gray = (np.clip(wide, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def check_image_array(image: object) -> np.ndarray:
    """Accept RGB uint8 [H, W, 3] (or grayscale [H, W]) arrays; raise a clear error otherwise."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image must have shape [H, W, 3], got {list(image.shape)}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ImageError("image is too small to hold a face")
    return np.ascontiguousarray(image)
