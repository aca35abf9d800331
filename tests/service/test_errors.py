"""Bad input gets a clear 4xx in the one error envelope and changes nothing. The server runs
on embedded defaults (no configuration but small limits), which is checked too."""

from __future__ import annotations

import io
import os
import stat

import httpx
import numpy as np
import pytest
from PIL import Image

from advplugin.settings import default_key_dir
from tests.service.conftest import Server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory, face_data):
    wd = tmp_path_factory.mktemp("embedded")
    # No database URL, key file, scheme or extractor: the embedded defaults. Only limits.
    server = Server(wd, {"ADVPLUGIN_MAX_PIXELS": "1000000", "ADVPLUGIN_MAX_UPLOAD_BYTES": "300000"})
    server.env = {k: v for k, v in server.env.items()
                  if not k.startswith("ADVPLUGIN_") or k.startswith(("ADVPLUGIN_MAX", "ADVPLUGIN_API_KEY"))}
    server.start()
    yield server
    server.stop()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def test_embedded_defaults(default_server) -> None:
    data = default_server.workdir / ".advplugin" / "data"
    # The keys live in the user's config folder, not in the folder tree of the data (whose
    # copy, the natural backup, would otherwise carry them): `.advplugin/` holds no key.
    keys = default_key_dir(data)
    assert keys.is_relative_to(os.environ["XDG_CONFIG_HOME"]) and not keys.is_relative_to(default_server.workdir)
    key_file = keys / "key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and (keys / "erasure-keys.db").is_file()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]
    assert not [p for p in data.rglob("*") if "key" in p.name and p.name != "api-key"]
    assert stat.S_IMODE(data.parent.stat().st_mode) == stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "gallery.db").is_file() and list((data / "index").glob("*.npz"))
    assert "WARNING" not in default_server.log()
    with default_server.client() as c:
        st = c.get("/status").json()
    assert st["scheme"] == "xnn" and st["extractor"]["name"] == "dlib" and st["mode"] == "images"
    log = default_server.log()
    assert f"key id {st['key_id']}" in log
    secret = key_file.read_text().split(":", 1)[1].strip()
    assert secret not in log and secret not in str(st)


def test_bad_input_is_refused_and_changes_nothing(default_server, face_data) -> None:
    face = sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0].read_bytes()
    with default_server.client() as c:
        assert c.post("/enroll", files={"file": ("a.jpg", face)}, data={"subject": "Aaron"}).status_code == 201
        before = c.get("/status").json()
        st = before
        prot = {"scheme": st["scheme"], "scheme_version": st["scheme_version"], "key_id": st["key_id"],
                "extractor_name": "dlib", "extractor_version": "x"}
        marker = 0.123456789
        good = (np.ones(128) / np.sqrt(128)).tolist()
        wrong_dim = [marker] * 64
        cases = {
            "not an image": (c.post, "/enroll", {"files": {"file": ("a.jpg", b"hello, not an image")},
                                                 "data": {"subject": "X"}}, 422, "invalid_image"),
            "truncated image": (c.post, "/enroll", {"files": {"file": ("a.jpg", face[: len(face) // 2])},
                                                    "data": {"subject": "X"}}, 422, "invalid_image"),
            "too many pixels": (c.post, "/identify", {"files": {"file": (
                "a.png", _png(np.zeros((1100, 1000, 3), np.uint8)))}}, 422, "invalid_image"),
            "too many bytes": (c.post, "/enroll", {"files": {"file": ("a.jpg", face + bytes(400_000))},
                                                   "data": {"subject": "X"}}, 413, "too_large"),
            "zero faces": (c.post, "/enroll", {"files": {"file": (
                "a.jpg", _jpeg(np.full((250, 250, 3), 128, np.uint8)))}, "data": {"subject": "X"}}, 422, "no_face"),
            "missing subject": (c.post, "/enroll", {"files": {"file": ("a.jpg", face)}}, 422, "invalid_request"),
            "missing file": (c.post, "/enroll", {"data": {"subject": "X"}}, 422, "invalid_request"),
            "unknown subject (verify)": (c.post, "/verify", {"files": {"file": ("a.jpg", face)},
                                                             "data": {"subject": "Nobody"}}, 404, "unknown_subject"),
            "unknown subject (get)": (c.get, "/subjects/Nobody", {}, 404, "unknown_subject"),
            "unknown subject (delete)": (c.delete, "/subjects/Nobody", {}, 404, "unknown_subject"),
            "wrong dimension": (c.post, "/enroll/templates", {"json": {"protection": prot, "items": [
                {"subject": "X", "template": wrong_dim}]}}, 422, "wrong_dimension"),
            "wrong scheme": (c.post, "/enroll/templates", {"json": {"protection": prot | {"scheme": "none"},
                "items": [{"subject": "X", "template": good}]}}, 422, "wrong_scheme"),
            "wrong key": (c.post, "/identify/templates", {"json": {"protection": prot | {"key_id": "0" * 16},
                "templates": [good]}}, 422, "wrong_key"),
            "template not a list": (c.post, "/enroll/templates", {"json": {"protection": prot, "items": [
                {"subject": "X", "template": "abc"}]}}, 422, "invalid_request"),
        }
        for name, (method, path, kw, status, code) in cases.items():
            r = method(path, **kw)
            assert r.status_code == status, (name, r.status_code, r.text)
            body = r.json()
            assert body["error"]["code"] == code and body["error"]["message"], name
            assert "0.1234" not in r.text, name  # input values are never echoed
        for headers in ({}, {"x-api-key": "wrong-key"}, {"x-api-key": "x" * 10_000}):
            r = httpx.post(default_server.url + "/identify", files={"file": ("a.jpg", face)}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        after = c.get("/status").json()
    assert after == before  # nothing changed: counts, index size and change sequence


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_openapi_documents_the_api_with_examples(default_server) -> None:
    spec = httpx.get(default_server.url + "/openapi.json").json()
    for path in ("/enroll", "/identify", "/verify", "/enroll/templates", "/identify/templates",
                 "/subjects", "/subjects/{name}", "/health", "/status"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert schemas["IdentifyResponse"].get("examples") and schemas["EnrollResponse"].get("examples")
    assert "ErrorResponse" in schemas
    # No response schema carries a vector.
    for name, schema in schemas.items():
        if name.endswith("Response"):
            assert "template" not in str(schema.get("properties", {})).replace("templates", "").replace(
                "template_id", "").replace("template_count", "").replace("template_dim", ""), name
