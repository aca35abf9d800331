"""Hostile input over real HTTP (issue 12's table): every string the API stores is bounded
and NUL-free on both databases, every subject that can be enrolled can be erased, numbers
out of range are 422s, unparsable and oversized bodies get their documented answers, an
unexpected failure is a 500 without a traceback that keeps the connection open.

One template-mode server per database serves the module (starting one costs seconds); the
tests that break their server on purpose start their own.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from advplugin.keys import Key
from advplugin.protectors import create_protector
from tests.service.conftest import Server, migrated_database
from tests.service.helpers import protection_of, template_env

BACKENDS = ["sqlite", "postgresql"]


class TemplateService:
    """A template-mode server with the client's protector and `protection` block."""

    def __init__(self, server: Server, key: Key) -> None:
        self.server = server
        self.protector = create_protector("xnn", key=key, dim=128)
        self.prot = protection_of(self.protector)
        self._rng = np.random.default_rng(0)

    def templates(self, n: int) -> np.ndarray:
        return self.protector.protect(self._rng.normal(size=(n, 128)).astype(np.float32))

    def enroll(self, c: httpx.Client, names: list[str], **prot: object) -> httpx.Response:
        items = [{"subject": n, "template": t.tolist()} for n, t in zip(names, self.templates(len(names)), strict=True)]
        return c.post("/enroll/templates", json={"protection": self.prot | prot, "items": items})


@pytest.fixture(scope="module", params=BACKENDS)
def service(request, tmp_path_factory) -> TemplateService:
    tmp = tmp_path_factory.mktemp(f"hardening-{request.param}")
    url = migrated_database(request.param, tmp, request)
    key = Key.generate()
    server = Server(tmp, template_env(url, tmp, key)).start()
    request.addfinalizer(server.stop)
    return TemplateService(server, key)


def _counts(c: httpx.Client) -> tuple[int, int, int]:
    st = c.get("/status").json()
    return st["subject_count"], st["template_count"], st["index"]["last_change"]


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def test_stored_strings_are_bounded(service: TemplateService) -> None:
    """A 100 kB extractor_version was copied into every row (SQLite grew 206 MB per 1 MB
    request) and was a 500 on PostgreSQL (VARCHAR(128))."""
    with service.server.client() as c:
        before = _counts(c)
        for prot in ({"extractor_version": "v" * 129}, {"extractor_version": "v" * 100_000},
                     {"extractor_name": "d" * 129}, {"extractor_version": ""}):
            _assert_error(service.enroll(c, ["Bounded"], **prot), 422, "invalid_request")
        _assert_error(service.enroll(c, ["s" * 256]), 422, "invalid_request")
        assert _counts(c) == before  # refused before anything was written
        # At the limits, both databases store them.
        assert service.enroll(c, ["s" * 255], extractor_version="v" * 128).status_code == 201
        assert c.get(f"/subjects/{'s' * 255}").status_code == 200
        assert c.delete(f"/subjects/{'s' * 255}").status_code == 200


def test_nul_bytes_are_refused_in_json_and_path(service: TemplateService) -> None:
    """PostgreSQL cannot store NUL (a 500 DataError on 7 endpoints); SQLite stored it."""
    with service.server.client() as c:
        before = _counts(c)
        _assert_error(service.enroll(c, ["a\x00b"]), 422, "invalid_request")
        _assert_error(service.enroll(c, ["ok"], extractor_version="v\x00"), 422, "invalid_request")
        _assert_error(service.enroll(c, ["ok"], key_id="k\x00"), 422, "invalid_request")
        # A lone surrogate (valid JSON, not encodable as UTF-8 text): refused the same way.
        body = json.dumps({"protection": service.prot, "items": [
            {"subject": "PLACEHOLDER", "template": service.templates(1)[0].tolist()}]})
        r = c.post("/enroll/templates", content=body.replace("PLACEHOLDER", "\\ud800"),
                   headers={"content-type": "application/json"})
        _assert_error(r, 422, "invalid_request")
        for method in (c.get, c.delete):
            _assert_error(method("/subjects/a%00b"), 422, "invalid_request")
        assert _counts(c) == before


@pytest.mark.parametrize("name", ["a/b", "../x", "a/../../b", "%2F", "x/"])
def test_every_enrollable_subject_can_be_read_and_erased(service: TemplateService, name: str) -> None:
    """`a/b` and `../x` were enrolled (201) but GET/DELETE /subjects/a%2Fb answered 404."""
    with service.server.client() as c:
        r = service.enroll(c, [name])
        assert r.status_code == 201, r.text
        stored = r.json()["templates"][0]["subject"]
        path = f"/subjects/{quote(stored, safe='')}"
        got = c.get(path)
        assert got.status_code == 200 and got.json()["subject"] == stored
        deleted = c.delete(path)
        assert deleted.status_code == 200 and deleted.json() == {"subject": stored, "deleted_templates": 1}
        assert c.get(path).status_code == 404


def test_page_overflow_is_a_422(service: TemplateService) -> None:
    with service.server.client() as c:
        for page in ("9223372036854775808", str(2**31), "-1"):
            _assert_error(c.get("/subjects", params={"page": page}), 422, "invalid_request")
        r = c.get("/subjects", params={"page": 2**31 - 1, "size": 1000})
        assert r.status_code == 200 and r.json()["subjects"] == []


def test_created_at_is_timezone_aware(service: TemplateService) -> None:
    """SQLite returns naive datetimes: `created_at` had no zone (a schema violation)."""
    with service.server.client() as c:
        assert service.enroll(c, ["Zoned"]).status_code == 201
        listed = [s for s in c.get("/subjects", params={"size": 1000}).json()["subjects"] if s["subject"] == "Zoned"]
        one = c.get("/subjects/Zoned").json()
        for s in (listed[0], one):
            created = datetime.fromisoformat(s["created_at"])
            assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
        c.delete("/subjects/Zoned")


def test_template_values_must_be_json_numbers(service: TemplateService) -> None:
    """"0.1" strings and booleans were accepted as template values."""
    t = service.templates(1)[0]
    with service.server.client() as c:
        before = _counts(c)
        for bad in ([str(v) for v in t], [True, *t[1:].tolist()], [None, *t[1:].tolist()]):
            r = c.post("/enroll/templates", json={"protection": service.prot, "items": [
                {"subject": "Strict", "template": bad}]})
            _assert_error(r, 422, "invalid_request")
            r = c.post("/identify/templates", json={"protection": service.prot, "templates": [bad]})
            _assert_error(r, 422, "invalid_request")
        # NaN and Infinity are not JSON, but Python's parser reads them: refused too.
        for literal in ("NaN", "Infinity"):
            body = json.dumps({"protection": service.prot, "templates": [t.tolist()], "threshold": 0.5})
            r = c.post("/identify/templates", content=body.replace("0.5", literal),
                       headers={"content-type": "application/json"})
            _assert_error(r, 422, "invalid_request")
        assert _counts(c) == before
        # Integers are numbers (JSON.stringify writes 0.0 as 0).
        ints = np.zeros(128)
        ints[0] = 1
        r = c.post("/identify/templates", json={"protection": service.prot, "templates": [[int(v) for v in ints]]})
        assert r.status_code == 200, r.text


def test_malformed_bodies_are_documented_422s(service: TemplateService) -> None:
    """Malformed multipart or JSON got an undocumented 400 (or a 500 for some JSON)."""
    with service.server.client() as c:
        cases = {
            "truncated JSON": (b'{"protection": {', "application/json"),
            "not UTF-8": (b'{"protection": "\xff\xfe"}', "application/json"),
            "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
            "huge integer": (b'{"templates": [[' + b"9" * 5000 + b"]]}", "application/json"),
        }
        for name, (body, ctype) in cases.items():
            r = c.post("/identify/templates", content=body, headers={"content-type": ctype})
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_request", name
        r = c.post("/identify", content=b"--xx\r\nnot a part", headers={
            "content-type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    spec = httpx.get(service.server.url + "/openapi.json").json()
    for path in ("/identify", "/enroll/templates"):
        assert {"413", "422"} <= set(spec["paths"][path]["post"]["responses"]), path
    assert "429" in spec["paths"]["/identify"]["post"]["responses"]


def test_oversized_bodies_are_413_before_parsing(service: TemplateService) -> None:
    """A chunked upload over the limit got 400 "error parsing the body"; a template request
    was parsed whole (9 MB, +160 MB RSS) before its template count was checked."""
    limit = 1000 * (128 * 24 + 255 * 6 + 64) + 64 * 1024  # the default settings' limit
    one = json.dumps({"protection": service.prot, "templates": [service.templates(1)[0].tolist()]}).encode()
    padded = one[:-1] + b", " + b'"x": "' + b"y" * (limit + 10) + b'"}'

    def chunks():
        for i in range(0, len(padded), 65536):
            yield padded[i : i + 65536]

    with service.server.client() as c:
        r = c.post("/identify/templates", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers  # really chunked
        _assert_error(r, 413, "too_large")
        r = c.post("/identify/templates", content=padded, headers={"content-type": "application/json"})
        _assert_error(r, 413, "too_large")
        # A GET or DELETE has no use for a body: bounded small.
        _assert_error(c.request("DELETE", "/subjects/x", content=b"z" * 200_000), 413, "too_large")
        assert c.get("/health").status_code == 200


def test_options_allow_lists_every_method_of_the_path(service: TemplateService) -> None:
    r = httpx.options(service.server.url + "/subjects/someone")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}
    r = httpx.put(service.server.url + "/enroll/templates")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_docs_are_served_without_a_cdn(service: TemplateService) -> None:
    """/docs loaded Swagger UI from a CDN: blank on an offline deployment."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(service.server.url + page).text
        assert "cdn." not in html and "https://" not in html.replace("https://github.com", ""), page
        assets = [a.split('"')[0] for a in html.split('src="')[1:] + html.split('href="')[1:]]
        local = [a for a in assets if a.startswith("/") and a.rsplit(".", 1)[-1] in ("js", "css")]
        assert local, page
        for asset in local:
            r = httpx.get(service.server.url + asset)
            assert r.status_code == 200 and len(r.content) > 10_000, asset


def _raw_request(sock: socket.socket, request: bytes) -> bytes:
    """Send one HTTP/1.1 request on an open socket and read its whole response."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_500_logs_no_traceback_and_keeps_the_connection(tmp_path: Path, key) -> None:
    """After a 500, uvicorn printed the full traceback and dropped the keep-alive connection."""
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    server = Server(tmp_path, template_env(url, tmp_path, key)).start()
    try:
        engine = create_engine(url)
        with engine.begin() as conn:  # break the database under the running service
            conn.execute(text("ALTER TABLE subjects RENAME TO subjects_gone"))
        engine.dispose()
        get = (f"GET /subjects HTTP/1.1\r\nHost: x\r\nx-api-key: {server.api_key}\r\n\r\n").encode()
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            first = _raw_request(sock, get)
            assert first.startswith(b"HTTP/1.1 500")
            head, _, body = first.partition(b"\r\n\r\n")
            assert json.loads(body)["error"]["code"] == "internal_error"
            request_id = next(line.split(b":")[1].strip() for line in head.split(b"\r\n")
                              if line.lower().startswith(b"x-request-id")).decode()
            assert request_id in json.loads(body)["error"]["message"]
            assert b"connection: close" not in head.lower()
            assert _raw_request(sock, health).startswith(b"HTTP/1.1 200")  # same connection
        log = server.log()
        assert "Traceback" not in log and "no such table" not in log and "SELECT" not in log
        assert f"internal error OperationalError (request id {request_id})" in log
    finally:
        server.stop()
