"""The CompreFace routes' bounds and refusals over real HTTP (no SDK needed): image bodies
larger than the small default body bound are accepted up to `max_upload_bytes` (multipart
and base64 JSON, on the fixed paths and on `/faces/{image_id}/verify`), larger ones refused
with 413 before parsing; errors keep CompreFace's shape and never echo request content."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.service.conftest import migrated_database

LIMIT = 400_000


@pytest.fixture
def big_png(face_data) -> bytes:
    """An lfw-dev photo upscaled to a PNG larger than the 64 kB default body bound."""
    first = sorted((face_data / "lfw-dev").rglob("*.jpg"))[0]
    img = Image.open(first).convert("RGB").resize((400, 400))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    assert 64 * 1024 < len(data) < LIMIT
    return data


@pytest.mark.slow
def test_image_bodies_are_bounded_by_the_upload_limit_not_the_small_body_limit(
    big_png, key_file, tmp_path, make_server, request
) -> None:
    kpath, _ = key_file
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": migrated_database("sqlite", tmp_path, request),
        "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"), "ADVPLUGIN_KEY_FILE": str(kpath),
        "ADVPLUGIN_SCHEME": "xnn", "ADVPLUGIN_MAX_UPLOAD_BYTES": str(LIMIT),
    })
    c = server.client()
    b64 = base64.b64encode(big_png).decode()
    r = c.post("/api/v1/detection/detect", json={"file": b64})
    assert r.status_code == 200, r.text
    assert set(r.json()["result"][0]["box"]) == {"probability", "x_max", "y_max", "x_min", "y_min"}
    r = c.post("/api/v1/recognition/faces", params={"subject": "Big"}, files={"file": ("a.png", big_png)})
    assert r.status_code == 201, r.text
    image_id = r.json()["image_id"]
    r = c.post(f"/api/v1/recognition/faces/{image_id}/verify", json={"file": b64})
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["similarity"] > 0.99  # the same photo
    r = c.post("/api/v1/verification/verify", json={"source_image": b64, "target_image": b64})
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["face_matches"][0]["similarity"] > 0.99

    oversize = big_png * (LIMIT // len(big_png) + 1)  # more bytes than max_upload_bytes
    too_big = base64.b64encode(oversize).decode()
    for path in ("/api/v1/detection/detect", f"/api/v1/recognition/faces/{image_id}/verify"):
        r = c.post(path, json={"file": too_big})
        assert r.status_code == 413, (path, r.status_code)
    r = c.post("/api/v1/recognition/faces", params={"subject": "Big"},
               files={"file": ("a.png", oversize)})
    assert r.status_code == 413

    # errors: CompreFace's shape, no request content echoed
    r = c.post("/api/v1/recognition/recognize", json={"file": "not base64 at all!"})
    assert r.status_code == 400 and r.json()["code"] == 21
    assert "not base64 at all" not in r.text
    r = c.post("/api/v1/recognition/faces/999999/verify", json={"file": b64})
    assert r.status_code == 404 and r.json()["code"] == 11
    r = c.post("/api/v1/recognition/recognize", params={"face_plugins": "age,gender"}, json={"file": b64})
    assert r.status_code == 400 and r.json()["code"] == 36
    r = c.get("/api/v1/recognition/faces", params={"size": 0})
    assert r.status_code == 400 and r.json()["code"] == 26
    r = server.client(api_key="wrong").get("/api/v1/recognition/subjects")
    assert r.status_code == 401 and r.json()["code"] == 20 and "wrong" not in r.text
