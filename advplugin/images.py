"""Decoding untrusted images with bounded cost.

Uploads and folders may hold anything: decompression bombs, truncated files, CMYK or
16-bit images, formats nobody sends a face in. Everything is decoded here, once, to RGB
uint8 (16-bit samples scaled, not clipped), with three bounds:

- **An allowlist of formats** (`ACCEPTED_FORMATS`: JPEG, PNG, WebP). Only their openers run
  (`Image.open(formats=...)`); anything else is "not a recognised image". Pillow knows about
  40 formats, and the others are where the trouble was (issue 22): an ICO's directory declares
  256x256 while its embedded PNG is 13000x13000 and was decoded in full (3 GB) before any size
  check; ICNS, DDS, QOI, SGI and XBM files raised errors nobody caught; EPS runs Ghostscript.
  In the three accepted formats the size in the header is the size that is decoded.
- **The declared size, read from the header before decoding.** `Image.open` parses only the
  header; a width x height over `max_pixels` is refused before `load()` allocates or
  decodes anything, so a 13000x13000 PNG costs what its header costs.
- **Every decoder failure is an `ImageError`** (the service's 422 `invalid_image`): Pillow's
  decoders raise `OSError`, `SyntaxError`, `EOFError`, `ValueError`, `struct.error`,
  `IndexError`, ... on crafted input. The message names the failure's type, never the file's
  content.

Pillow's own bounds are left as they are (no global is changed here, as other code in the
process may decode images too): `ImageFile.LOAD_TRUNCATED_IMAGES` off (a truncated file
fails), PNG text and ICC chunks inflated to at most `PngImagePlugin.MAX_TEXT_CHUNK` (1 MB)
each and `MAX_TEXT_MEMORY` (64 MB) per image, and `Image.MAX_IMAGE_PIXELS` (89 M pixels; a
`DecompressionBombError` past twice that) behind our stricter `max_pixels`.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from advplugin.errors import InvalidInputError

DEFAULT_MAX_PIXELS = 40_000_000
#: The formats a face service needs (Pillow's names); `load_image(formats=)` may widen them
#: for trusted files.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
#: What the operator's own image folders may hold (`advplugin embed`, the evaluation harness):
#: the same, and BMP, which those folders always took. Uploads to the service stay at
#: `ACCEPTED_FORMATS`.
FOLDER_FORMATS: tuple[str, ...] = (*ACCEPTED_FORMATS, "BMP")
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}

#: What Pillow's openers and decoders raise on crafted or truncated files (besides
#: `UnidentifiedImageError`, an `OSError`, and `DecompressionBombError`, caught first).
_DECODE_ERRORS = (
    OSError, SyntaxError, EOFError, ValueError, struct.error, IndexError, KeyError, TypeError,
    ZeroDivisionError, OverflowError, NotImplementedError, RuntimeError,
)


class ImageError(InvalidInputError):
    """The input is not a usable image; the message says why (never echoes content)."""


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = ACCEPTED_FORMATS,
) -> np.ndarray:
    """Decode a file path or encoded bytes to an RGB uint8 array [H, W, 3]: only `formats`,
    only when the header declares at most `max_pixels`; anything else raises `ImageError`."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(Path(source), "rb")
    except OSError as e:
        raise ImageError(f"cannot open image: {e.strerror}") from None
    with stream:
        try:
            rgb = _decode(stream, max_pixels, list(formats))
        except ImageError:
            raise
        except UnidentifiedImageError:
            accepted = ", ".join(_FORMAT_NAMES.get(f, f) for f in formats)
            raise ImageError(f"not a recognised image in an accepted format ({accepted})") from None
        except Image.DecompressionBombError:
            raise ImageError("image exceeds the decompression limit") from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"image is truncated or corrupt ({type(e).__name__})") from None
    return np.asarray(rgb, dtype=np.uint8)


def _decode(stream: io.IOBase, max_pixels: int, formats: list[str]) -> Image.Image:
    with Image.open(stream, formats=formats) as img:  # parses the header only
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"image has {w}x{h} pixels, more than the limit of {max_pixels}")
        img.load()
        if img.size != (w, h):  # not in the accepted formats; a guard for widened ones
            raise ImageError("image decodes to another size than its header declares")
        return _to_rgb(img)


#: Modes holding more than 8 bits per sample, which Pillow's convert("RGB") clips instead of
#: scaling: a 16-bit grayscale PNG of a face came out almost white (mean 234 instead of 60)
#: and no face was found.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per sample; 16-bit grayscale (and 32-bit integer, read as 16-bit
    samples, as PNG and TIFF store them) scaled by 255/65535 rather than clipped."""
    if img.mode not in _WIDE_GRAY_MODES:
        return img.convert("RGB")
    wide = np.asarray(img).astype(np.int32)  # I;16 fits; int64 would double the memory
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
