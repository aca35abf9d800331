"""The service's limits over real HTTP, on both API families (issue 22, item 8): template
magnitudes, repeated form fields, a body that never arrives, faces largest first, one error
shape per family for every status (413 before routing, 500, the server's own 400), the same
byte bound for base64 and multipart images, and a JSON log that is JSON from its first line.

One image-mode service (real uvicorn on 127.0.0.1, real dlib) serves the module, with a JSON
log, a 1 s body timeout and a 300 kB upload bound; tests that need face images take them
from the LFW folder and skip without it.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from tests.service.conftest import Server, migrated_database

UPLOAD_LIMIT = 300_000
#: CompreFace's shape: its number, the message, the native envelope beside.
CF_KEYS = {"message", "code", "error"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("limits")
    url = migrated_database("sqlite", tmp, None)  # type: ignore[arg-type]
    srv = Server(tmp, {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp / "data"), "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_LOG_FORMAT": "json", "ADVPLUGIN_BODY_TIMEOUT_S": "1",
        "ADVPLUGIN_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    }).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def face(face_data: Path) -> bytes:
    return sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0].read_bytes()


def _native(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body


def _compreface(r: httpx.Response, status: int, cf_code: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == CF_KEYS, body
    assert body["code"] == cf_code and body["error"]["code"] == code and body["message"] == body["error"]["message"]
    return body


def _raw(port: int, request: bytes, *, trickle: bytes = b"", timeout: float = 20) -> tuple[bytes, bool]:
    """Send `request` on a new connection (then `trickle`, one byte every 0.2 s, until the
    server answers); the server's whole answer, and whether it then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.settimeout(0.2 if trickle else timeout)
        data = b""
        for byte in trickle:
            try:
                data = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(bytes([byte]))
        sock.settimeout(timeout)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"]
            if length and len(body) >= length[0] and b"connection: close" not in head.lower():
                return data, False


def _json_answer(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split(b" ")[1]), json.loads(body)


# -- templates -------------------------------------------------------------------------------------
def test_templates_of_absurd_magnitude_are_refused(server: Server) -> None:
    """A template of 128 values of 1e38 (finite) was accepted and never matched: its squared
    norm overflows float32 and it normalised to a zero vector."""
    with server.client() as c:
        st = c.get("/status").json()
        prot = {"scheme": st["scheme"], "scheme_version": st["scheme_version"], "key_id": st["key_id"],
                "extractor_name": "dlib", "extractor_version": "test"}
        unit = np.random.default_rng(0).normal(size=128)
        unit /= np.linalg.norm(unit)
        before = (st["template_count"], st["index"]["last_change"])
        for values in ([1e38] * 128, [1e20] * 128, [1e39] * 128, (unit * 1e5).tolist()):
            r = c.post("/identify/templates", json={"protection": prot, "templates": [values]})
            body = _native(r, 422, "invalid_template")
            assert "norm above" in body["error"]["message"] and "e+3" not in r.text and "1e+20" not in r.text
            r = c.post("/enroll/templates", json={"protection": prot, "items": [
                {"subject": "Huge", "template": values}]})
            _native(r, 422, "invalid_template")
        st = c.get("/status").json()
        assert (st["template_count"], st["index"]["last_change"]) == before  # nothing stored
        # Within the bound, any magnitude is a direction: accepted (cosine ignores the norm).
        for scale in (1e-3, 1.0, 100.0):
            r = c.post("/identify/templates", json={"protection": prot, "templates": [(unit * scale).tolist()]})
            assert r.status_code == 200, (scale, r.text)


# -- repeated form fields --------------------------------------------------------------------------
def test_a_form_field_given_twice_is_refused_on_every_form_route(server: Server, face: bytes) -> None:
    """Two `file` parts or two `subject` fields: Starlette's form kept the last, so the
    request went on with one of them silently (an enrolment under the second name)."""
    one, two = ("file", ("a.jpg", face, "image/jpeg")), ("file", ("b.jpg", face, "image/jpeg"))
    with server.client() as c:
        before = c.get("/status").json()["template_count"]
        native = {
            "/enroll two files": ("/enroll", [one, two], {"subject": "Twice"}),
            "/enroll two subjects": ("/enroll", [one], {"subject": ["Ann", "Bob"]}),
            "/enroll two faces options": ("/enroll", [one], {"subject": "Ann", "faces": ["all", "largest"]}),
            "/identify two files": ("/identify", [one, two], {}),
            "/verify two subjects": ("/verify", [one], {"subject": ["Ann", "Bob"]}),
            "/verify two thresholds": ("/verify", [one], {"subject": "Ann", "threshold": ["0.1", "0.9"]}),
        }
        for name, (path, files, data) in native.items():
            body = _native(c.post(path, files=files, data=data), 422, "invalid_request")
            assert "given 2 times" in body["error"]["message"], name
        cf = {
            "faces": ("/api/v1/recognition/faces", {"subject": "Twice"}, [one, two]),
            "recognize": ("/api/v1/recognition/recognize", {}, [one, two]),
            "detect": ("/api/v1/detection/detect", {}, [one, two]),
            "verification": ("/api/v1/verification/verify", {}, [
                ("source_image", ("a.jpg", face)), ("source_image", ("b.jpg", face))]),
        }
        for name, (path, params, files) in cf.items():
            body = _compreface(c.post(path, params=params, files=files), 400, 26, "invalid_request")
            assert "given 2 times" in body["message"], name
        r = c.post("/api/v1/recognition/faces", params={"subject": "Ann"}, files=[one])
        assert r.status_code == 201, r.text  # once is fine
        c.delete("/api/v1/recognition/subjects/Ann")
        assert c.get("/status").json()["template_count"] == before


# -- a body that never arrives ---------------------------------------------------------------------
def test_a_body_that_never_arrives_is_answered_408_and_the_connection_closed(server: Server) -> None:
    """Headers with a Content-Length and then nothing (or a trickle) held a connection and
    its request open for ever."""
    key = server.api_key.encode()
    native = (b"POST /identify/templates HTTP/1.1\r\nHost: x\r\nx-api-key: " + key +
              b"\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n")
    answer, closed = _raw(server.port, native)
    status, body = _json_answer(answer)
    assert status == 408 and closed and body == {"error": {
        "code": "request_timeout", "message": "the request body did not arrive within 1 s"}}
    compreface = (b"POST /api/v1/recognition/recognize HTTP/1.1\r\nHost: x\r\nx-api-key: " + key +
                  b"\r\ncontent-type: multipart/form-data; boundary=xx\r\ncontent-length: 5000\r\n\r\n")
    # A trickle: a byte every 0.2 s, never enough to finish the body before the deadline.
    answer, closed = _raw(server.port, compreface, trickle=b"--xx\r\ncontent-disposition: form-data")
    status, body = _json_answer(answer)
    assert status == 408 and closed and set(body) == CF_KEYS and body["error"]["code"] == "request_timeout"
    assert httpx.get(server.url + "/health").status_code == 200


# -- faces largest first ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group_photo(face_data: Path) -> bytes:
    """Three LFW faces at 60 %, 80 % and 100 % side by side: dlib, which orders its
    detections by score, finds them smallest first."""
    people = sorted((face_data / "lfw-dev").iterdir())[6:9]
    canvas = Image.new("RGB", (760, 260), (128, 128, 128))
    x = 0
    for person, scale in zip(people, (0.6, 0.8, 1.0), strict=True):
        img = Image.open(sorted(person.glob("*.jpg"))[0]).convert("RGB").resize((int(250 * scale),) * 2)
        canvas.paste(img, (x, 0))
        x += img.size[0] + 5
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _areas(boxes: list[dict]) -> list[int]:
    return [(b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"]) for b in boxes]


def test_faces_come_back_largest_first(server: Server, group_photo: bytes) -> None:
    """CompreFace documents faces largest first; they came back in the detector's order."""
    files = {"file": ("group.png", group_photo)}
    with server.client() as c:
        answers = {
            "/identify": [f["box"] for f in c.post("/identify", files=files).json()["result"]],
            "recognize": [f["box"] for f in c.post("/api/v1/recognition/recognize", files=files).json()["result"]],
            "detect": [f["box"] for f in c.post("/api/v1/detection/detect", files=files).json()["result"]],
        }
    for route, boxes in answers.items():
        areas = _areas(boxes)
        assert len(areas) >= 3 and areas == sorted(areas, reverse=True), (route, areas)
    assert _areas(answers["/identify"]) == _areas(answers["detect"])


# -- one error shape per family --------------------------------------------------------------------
def test_every_status_keeps_its_familys_shape(server: Server) -> None:
    """On CompreFace routes a 413 by Content-Length, and every 500, came in the native shape."""
    key = server.api_key.encode()
    big = b"POST %s HTTP/1.1\r\nHost: x\r\nx-api-key: " + key + b"\r\ncontent-length: 999999999\r\n\r\n"
    status, body = _json_answer(_raw(server.port, big % b"/api/v1/recognition/recognize")[0])
    assert status == 413 and set(body) == CF_KEYS and body["error"]["code"] == "too_large"
    status, body = _json_answer(_raw(server.port, big % b"/identify")[0])
    assert status == 413 and set(body) == {"error"} and body["error"]["code"] == "too_large"
    with server.client() as c:
        _compreface(c.get("/api/v1/no/such/route"), 404, 0, "not_found")
        r = c.put("/api/v1/detection/detect")
        _compreface(r, 405, 0, "method_not_allowed")
        assert r.headers["allow"] == "POST"
        _compreface(server.client(api_key="wrong").get("/api/v1/recognition/subjects"), 401, 20, "unauthorized")
        engine = create_engine(server.env["ADVPLUGIN_DATABASE_URL"])
        try:
            with engine.begin() as conn:  # break the database under the running service
                conn.execute(text("ALTER TABLE subjects RENAME TO subjects_gone"))
            body = _compreface(c.get("/api/v1/recognition/subjects"), 500, 0, "internal_error")
            assert "request id" in body["message"] and "subjects" not in body["message"]
            _native(c.get("/subjects"), 500, "internal_error")
        finally:
            with engine.begin() as conn:
                conn.execute(text("ALTER TABLE subjects_gone RENAME TO subjects"))
            engine.dispose()
        assert c.get("/api/v1/recognition/subjects").status_code == 200


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    # headers still incomplete past h11's bound on a buffered event (16 KiB)
    b"GET /health HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 20_000,
    b"GET /api/v1/recognition/subjects HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
], ids=["request-line", "header-size", "header-syntax"])
def test_the_servers_own_400_is_json_in_both_shapes(server: Server, request_bytes: bytes) -> None:
    """uvicorn answers what its HTTP parser cannot read before the app runs: it was plain
    text. Such a request has no trustworthy path, so the body serves both families."""
    answer, closed = _raw(server.port, request_bytes)
    status, body = _json_answer(answer)
    assert status == 400 and closed
    assert body["error"]["code"] == "invalid_request" and body["code"] == 26
    assert body["message"] == body["error"]["message"] and b"GARBAGE" not in answer and b"aaaa" not in answer


# -- the same byte bound for base64 and multipart --------------------------------------------------
def test_base64_and_multipart_images_have_the_same_byte_bound(server: Server, face: bytes) -> None:
    """Base64 in JSON was bounded by its string, which let `max_upload_bytes` + 2 through."""
    with server.client() as c:
        for size in (UPLOAD_LIMIT, UPLOAD_LIMIT + 1, UPLOAD_LIMIT + 2):
            image = face + bytes(size - len(face))  # a JPEG with trailing zeros: still decodes
            as_b64 = c.post("/api/v1/detection/detect", json={"file": base64.b64encode(image).decode()})
            as_file = c.post("/api/v1/detection/detect", files={"file": ("a.jpg", image)})
            if size == UPLOAD_LIMIT:
                assert as_b64.status_code == as_file.status_code == 200, (as_b64.text, as_file.text)
                assert as_b64.json() == as_file.json()
            else:
                for r in (as_b64, as_file):
                    _compreface(r, 413, 0, "too_large")
                assert as_b64.json() == as_file.json()


# -- JSON logs ------------------------------------------------------------------------------------
def _bomb_header_png() -> bytes:
    """A PNG whose header declares 10000x10000 pixels: over Pillow's decompression-bomb
    warning threshold (89 M), refused by the service's own bound from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_every_log_line_is_json(server: Server) -> None:
    """With ADVPLUGIN_LOG_FORMAT=json, 28 of 39 lines were not JSON: the start-up notices
    (printed), Python warnings (Pillow's DecompressionBombWarning, two plain lines each)."""
    with server.client() as c:
        r = c.post("/identify", files={"file": ("bomb.png", _bomb_header_png())})
        _native(r, 422, "invalid_image")
        c.get("/api/v1/recognition/subjects")
    _raw(server.port, b"NOT HTTP\r\n\r\n")
    deadline = time.monotonic() + 10
    while "DecompressionBombWarning" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = server.log().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"log line {i + 1} of {len(lines)} is not JSON: {line[:200]!r}")
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "advplugin.access", "py.warnings"} <= loggers, loggers
    assert any("DecompressionBombWarning" in r["message"] for r in records if r["logger"] == "py.warnings")
    assert any("key id" in r["message"] for r in records)  # the printed start-up notices, as records
    assert any(r["message"] == "Invalid HTTP request received." for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
