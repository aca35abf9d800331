"""Decoding untrusted images with bounded cost.

Uploads and folders may hold anything: decompression bombs, truncated files, CMYK or
16-bit images. Everything is decoded here, once, to RGB uint8, with a pixel limit checked
before the pixels are decoded.
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
                rgb = img.convert("RGB")
        except UnidentifiedImageError:
            raise ImageError("not a recognised image format") from None
        except (OSError, SyntaxError) as e:
            raise ImageError(f"image is truncated or corrupt ({type(e).__name__})") from None
        except Image.DecompressionBombError:
            raise ImageError("image exceeds the decompression limit") from None
    return np.asarray(rgb, dtype=np.uint8)


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
