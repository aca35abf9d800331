"""The binary framing of blind requests and responses.

Ciphertexts are 128 KiB each and a probe is 128 of them: as base64 in JSON they would cost a
third more bytes and a JSON parse of a 22 MB string. So a message is a small JSON header and
raw length-prefixed blobs:

    b"APHE" | version (1 byte) | header length (u32 LE) | header (UTF-8 JSON object)
            | blob count (u32 LE) | per blob: length (u32 LE) | bytes

`unpack` is written for untrusted input: every length is checked against the bytes present
and the caller's limits before anything is sliced, and every failure is a `WireError` (a
ValueError) with a message that names the problem, never the content.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from advplugin.errors import InvalidInputError

MAGIC = b"APHE"
VERSION = 1
#: Documented as plain binary (OpenAPI tools, fuzzers and proxies know it); the magic bytes
#: say what the body is.
MEDIA_TYPE = "application/octet-stream"
_U32 = struct.Struct("<I")


class WireError(InvalidInputError):
    """A message that is not a well-formed blind message within the limits."""


def pack(header: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), _U32.pack(len(head)), head, _U32.pack(len(blobs))]
    for blob in blobs:
        parts += [_U32.pack(len(blob)), blob]
    return b"".join(parts)


def unpack(data: bytes, *, max_header: int = 1 << 20, max_blobs: int = 1024) -> tuple[dict[str, Any], list[bytes]]:
    """(header, blobs) of a message; raises WireError on anything malformed or over limits."""
    view = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise WireError(f"message truncated in its {what}")
        out = view[pos : pos + n]
        pos += n
        return out

    if bytes(take(4, "magic")) != MAGIC:
        raise WireError("not a blind message (bad magic); send what advplugin.he.wire.pack makes")
    version = take(1, "version")[0]
    if version != VERSION:
        raise WireError(f"unsupported message version {version} (this service reads {VERSION})")
    n_head = _U32.unpack(take(4, "header length"))[0]
    if n_head > max_header:
        raise WireError(f"message header is larger than {max_header} bytes")
    try:
        header = json.loads(bytes(take(n_head, "header")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("message header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError("message header must be a JSON object")
    count = _U32.unpack(take(4, "blob count"))[0]
    if count > max_blobs:
        raise WireError(f"message has {count} ciphertexts, more than {max_blobs}")
    blobs = [bytes(take(_U32.unpack(take(4, "blob length"))[0], "ciphertext")) for _ in range(count)]
    if pos != len(view):
        raise WireError("message has trailing bytes")
    return header, blobs
