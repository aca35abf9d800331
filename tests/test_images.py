"""Untrusted image bytes decode safely or fail with a clear ImageError: only JPEG, PNG and
WebP are opened, the declared size is refused before decoding, and every decoder failure on
a crafted file (issue 22) is an ImageError that echoes nothing of the file."""

from __future__ import annotations

import functools
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from advplugin.images import ACCEPTED_FORMATS, ImageError, load_image


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_decodes_to_rgb_uint8() -> None:
    gray = np.full((40, 30), 200, np.uint8)
    img = load_image(encode(gray, "PNG"))
    assert img.shape == (40, 30, 3) and img.dtype == np.uint8 and (img == 200).all()


def test_not_an_image() -> None:
    with pytest.raises(ImageError, match=r"not a recognised image in an accepted format \(JPEG, PNG, WebP\)"):
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


def test_32_bit_integer_image_with_8_bit_values_is_kept_when_tiff_is_allowed() -> None:
    """TIFF is refused by default (no accepted format decodes to mode I); a caller that widens
    `formats` for trusted files still gets 8-bit values in an integer image kept."""
    values = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 256
    buf = io.BytesIO()
    Image.fromarray(values, "I").save(buf, format="TIFF")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(buf.getvalue())
    np.testing.assert_array_equal(load_image(buf.getvalue(), formats=("TIFF",))[..., 0], values)


# -- crafted files (issue 22): builders shared with tests/service/test_image_fuzz.py --------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def small_png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


def png_with_inflating_chunk(kind: bytes = b"zTXt", inflated: int = 2 << 20) -> bytes:
    """A small PNG with a zTXt (or iCCP) chunk that inflates past Pillow's 1 MB text limit:
    Pillow raised ValueError, which answered 500."""
    body = b"k\x00\x00" + zlib.compress(b"a" * inflated, 9)
    png = small_png()
    return png[:33] + png_chunk(kind, body) + png[33:]  # after the 8-byte signature and IHDR


BOMB_SIDE = 13000


@functools.cache
def png_bomb() -> bytes:
    """A valid black 13000x13000 RGB PNG: 490 KB, 507 MB decoded."""
    side = BOMB_SIDE
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    z = zlib.compressobj(9)
    block = b"\x00" * (1 + 3 * side) * 1000
    rows, parts = side, []
    while rows > 0:
        parts.append(z.compress(block[: (1 + 3 * side) * min(rows, 1000)]))
        rows -= 1000
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


@functools.cache
def ico_bomb() -> bytes:
    """The issue's ICO: its directory declares 256x256 (0 = 256) and its one entry is the
    13000x13000 PNG (the issue saw such files decoded in full before the size check: 3 GB)."""
    png = png_bomb()
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


#: The mode each writer needs where it cannot write RGB.
WRITE_MODES = {"XBM": "1", "MSP": "1", "BLP": "P", "PALM": "P"}


def encoded(fmt: str, size: tuple[int, int] = (64, 64), image: Image.Image | None = None) -> bytes:
    """`image` (default: a flat colour) saved as `fmt`, converted to a mode its writer takes."""
    img = image if image is not None else Image.new("RGB", size, (120, 80, 40))
    buf = io.BytesIO()
    img.convert(WRITE_MODES.get(fmt, "RGB")).save(buf, format=fmt)
    return buf.getvalue()


def test_png_with_a_chunk_inflating_past_the_text_limit_is_an_image_error() -> None:
    for kind in (b"zTXt", b"iCCP"):
        data = png_with_inflating_chunk(kind)
        assert len(data) < 80_000
        with pytest.raises(ImageError, match="truncated or corrupt") as e:
            load_image(data)
        assert "aaaa" not in str(e.value)  # nothing of the file echoed


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "DDS", "QOI", "SGI", "XBM", "BMP", "GIF", "TIFF", "TGA",
                                 "PPM", "PCX", "JPEG2000", "PDF", "EPS", "IM", "MSP", "SPIDER", "BLP"])
def test_formats_outside_the_allowlist_are_refused(fmt: str) -> None:
    try:
        data = encoded(fmt)
    except (OSError, KeyError, ValueError) as e:  # a writer this Pillow build lacks
        pytest.skip(f"Pillow cannot write {fmt}: {e}")
    with pytest.raises(ImageError, match=r"not a recognised image in an accepted format \(JPEG, PNG, WebP\)"):
        load_image(data)


def test_mangled_files_of_the_issue_are_refused_not_crashing() -> None:
    """The issue's 500s: an ICNS with a wrong embedded size, truncated DDS and QOI, mangled
    SGI and XBM headers. They never reach a decoder now."""
    icns = bytearray(encoded("ICNS", (32, 32)))
    icns[4:8] = struct.pack(">I", 0x7FFFFFFF)  # the file's declared length
    sgi = bytearray(encoded("SGI"))
    sgi[6:10] = b"\xff\xff\xff\xff"  # dimension and xsize
    crafted = [bytes(icns), encoded("DDS")[:200], encoded("QOI")[:30], bytes(sgi),
               b"#define im_width 99999\n#define im_height 99999\nstatic char im_bits[] = {0x"]
    for data in crafted:
        with pytest.raises(ImageError, match="not a recognised image"):
            load_image(data)


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_truncated_accepted_formats_are_image_errors(fmt: str) -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    assert load_image(data).shape == (200, 200, 3)
    for cut in (len(data) // 2, len(data) * 3 // 4, 40, 12):
        with pytest.raises(ImageError):
            load_image(data[:cut])


def test_declared_size_is_refused_before_decoding(monkeypatch) -> None:
    """A 13000x13000 PNG (490 KB, 507 MB decoded) is refused from its header: well under a
    second, and no decoder ever runs."""
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    data = png_bomb()
    start = time.perf_counter()
    with pytest.raises(ImageError, match="13000x13000 pixels, more than the limit of 25000000"):
        load_image(data, max_pixels=25_000_000)
    elapsed = time.perf_counter() - start
    print(f"13000x13000 PNG refused from its header in {elapsed * 1000:.2f} ms")
    assert elapsed < 0.2 and loads == []
    ico = ico_bomb()
    start = time.perf_counter()
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(ico, max_pixels=25_000_000)
    assert time.perf_counter() - start < 0.2 and loads == []
    assert load_image(small_png()).shape == (16, 16, 3) and loads  # the patch sees loads


def test_other_exceptions_of_a_decoder_are_image_errors(monkeypatch) -> None:
    """Whatever a decoder raises at the decode boundary (struct.error, EOFError, IndexError,
    ...) is an ImageError naming only its type."""
    for exc in (struct.error("unpack requires a buffer of 4 bytes"), EOFError(), IndexError("secret"),
                SyntaxError("bad"), ValueError("x"), Image.DecompressionBombError("y")):
        def boom(self, exc=exc):
            raise exc
        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
        with pytest.raises(ImageError) as e:
            load_image(small_png())
        assert "secret" not in str(e.value) and "unpack" not in str(e.value)
