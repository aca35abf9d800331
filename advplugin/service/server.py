"""What `advplugin serve` runs uvicorn with besides the app: the HTTP protocol whose own
answers (to requests the app never sees) keep the service's error shape.

A request the HTTP parser cannot read (a malformed request line or header, headers over
h11's size limit) is answered by uvicorn itself, before any ASGI app runs: a plain-text
`400 Invalid HTTP request received.` that neither API's clients can parse as an error. No
middleware can change it; the protocol class can, so `advplugin serve` passes uvicorn this
subclass of the protocol uvicorn would choose. Such a request has no path the service can
trust to tell its API family, so its body carries both shapes at once: the native envelope's
`error` object and CompreFace's `message` and `code` (26: invalid request), which is exactly
CompreFace's shape on this service (`errors.compreface_error`).

The app run under another server (gunicorn's workers, `uvicorn advplugin...` by hand) keeps
that server's own 400s.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from advplugin.service.errors import COMPREFACE_CODES

#: The message of the answer (uvicorn's own words; never anything of the request).
BAD_REQUEST = "the HTTP request could not be parsed"


def bad_request_response() -> bytes:
    """The whole 400 answer, head and body; the connection is closed after it, as uvicorn
    closes it after its own."""
    body = json.dumps({
        "error": {"code": "invalid_request", "message": BAD_REQUEST},
        "message": BAD_REQUEST, "code": COMPREFACE_CODES["invalid_request"],
    }).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _JsonBadRequest:
    """Replaces uvicorn's `send_400_response` (h11's and httptools' protocols both have it,
    with this signature; tests/service/test_limits.py fails if a uvicorn release drops it)."""

    transport: asyncio.Transport

    def send_400_response(self, msg: str) -> None:
        self.transport.write(bad_request_response())
        self.transport.close()


class JsonErrorsProtocol(_JsonBadRequest, AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools where installed, else h11) with JSON 400s."""
