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
