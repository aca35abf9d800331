"""Untrusted image bytes decode safely or fail with a clear ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from advplugin.images import ImageError, load_image


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_decodes_to_rgb_uint8() -> None:
    gray = np.full((40, 30), 200, np.uint8)
    img = load_image(encode(gray, "PNG"))
    assert img.shape == (40, 30, 3) and img.dtype == np.uint8 and (img == 200).all()


def test_not_an_image() -> None:
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"%PDF-1.4 definitely not a face")


def test_truncated_image() -> None:
    data = encode(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"truncated|corrupt"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageError, match="limit"):
        load_image(encode(np.zeros((300, 300, 3), np.uint8), "PNG"), max_pixels=300 * 299)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path / "nope.jpg")


def _sixteen_bit_png(gray8: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG holding `gray8` scaled to the full 16-bit range."""
    buf = io.BytesIO()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_png_is_scaled_not_clipped(face_data) -> None:
    """16-bit PNGs decoded clipped to white (mean 234 instead of 60): a real face gave
    `no_face`. Now they decode to the 8-bit image they were made from, and the face is found."""
    from advplugin.adapters import create_extractor

    jpg = sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0]
    gray8 = np.asarray(Image.open(jpg).convert("L"))
    data = _sixteen_bit_png(gray8)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit image
    img = load_image(data)
    assert img.dtype == np.uint8 and img.shape == (*gray8.shape, 3)
    np.testing.assert_array_equal(img[..., 0], gray8)
    assert len(create_extractor("dlib").extract(img).detections) == 1


def test_32_bit_integer_image_with_8_bit_values_is_kept() -> None:
    values = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 256
    buf = io.BytesIO()
    Image.fromarray(values, "I").save(buf, format="TIFF")
    np.testing.assert_array_equal(load_image(buf.getvalue())[..., 0], values)
