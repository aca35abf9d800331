"""Image requests under hostile input, over real HTTP with the real dlib extractor: NUL in
form fields on both databases, the detector's confidence reported in [0, 1], a crafted huge
image answered at a bounded cost, and a per-process cap on images in progress (429)."""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from advplugin.client import ApiError, Client
from tests.service.conftest import Server, migrated_database


def _crafted_png() -> bytes:
    """The issue's reproduction: a 3 KB black 5000x4999 PNG (under the 25 M pixel cap) that
    cost 15 s of CPU and 1.5 GB in the HOG detector with upsample 1."""
    buf = io.BytesIO()
    Image.new("1", (5000, 4999)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def face(face_data: Path) -> bytes:
    return sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0].read_bytes()


def _image_server(tmp: Path, url: str, **env: str) -> Server:
    return Server(tmp, {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp / "data"),
        "ADVPLUGIN_SCHEME": "xnn", **env,
    }).start()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def image_server(request, tmp_path_factory, face_data) -> Server:
    tmp = tmp_path_factory.mktemp(f"images-{request.param}")
    server = _image_server(tmp, migrated_database(request.param, tmp, request))
    request.addfinalizer(server.stop)
    return server


def test_form_fields_are_bounded_and_nul_free(image_server: Server, face: bytes) -> None:
    """A NUL in the form's subject was a 500 DataError on PostgreSQL (stored on SQLite)."""
    with image_server.client() as c:
        before = c.get("/status").json()["template_count"]
        for subject in ("a\x00b", "s" * 256, "   "):
            for path in ("/enroll", "/verify"):
                r = c.post(path, files={"file": ("a.jpg", face)}, data={"subject": subject})
                assert r.status_code == 422, (path, r.text)
                assert r.json()["error"]["code"] in ("invalid_request", "invalid_subject")
        assert c.get("/status").json()["template_count"] == before


def test_probability_is_a_confidence_in_0_1(image_server: Server, face: bytes) -> None:
    """dlib's HOG score (an SVM margin, e.g. 2.45) was returned as `probability`."""
    with image_server.client() as c:
        r = c.post("/enroll", files={"file": ("a.jpg", face)}, data={"subject": "Aaron"})
        assert r.status_code == 201, r.text
        boxes = [r.json()["templates"][0]["box"]]
        r = c.post("/identify", files={"file": ("a.jpg", face)})
        assert r.status_code == 200, r.text
        boxes += [f["box"] for f in r.json()["result"]]
    for box in boxes:
        assert 0.0 <= box["probability"] <= 1.0
        assert box["probability"] == pytest.approx(1 / (1 + math.exp(-box["score"])), abs=1e-6)
    assert any(box["score"] > 1.0 for box in boxes)  # the case that used to leak out


def test_crafted_image_is_answered_and_images_in_progress_are_capped(tmp_path: Path, face: bytes) -> None:
    """With one image allowed at a time, concurrent crafted images get 429 + Retry-After
    rather than a queue; each admitted one is answered (no face), and the service then
    answers a normal /identify. (Its CPU cost: benchmarks/image_cost_bench.py.)"""
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    server = _image_server(tmp_path, url, ADVPLUGIN_MAX_CONCURRENT_EXTRACTIONS="1")
    crafted = _crafted_png()
    start = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def send() -> None:
        with server.client() as c:
            start.wait()
            answers.append(c.post("/identify", files={"file": ("b.png", crafted)}))

    try:
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in answers)
        assert len(codes) == 4 and set(codes) <= {422, 429} and 422 in codes and 429 in codes, codes
        for r in answers:
            code = r.json()["error"]["code"]
            if r.status_code == 429:
                assert code == "busy" and int(r.headers["retry-after"]) >= 1
            else:
                assert code == "no_face"
        with server.client() as c:
            r = c.post("/identify", files={"file": ("a.jpg", face)})
            assert r.status_code == 200 and len(r.json()["result"]) == 1
        # The client package honours Retry-After: three at once all get their answer.
        errors: list[str] = []

        def send_with_client() -> None:
            with Client(server.url, server.api_key, retries=20) as c:
                try:
                    c.identify(crafted)
                except ApiError as e:
                    errors.append(e.code)

        threads = [threading.Thread(target=send_with_client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == ["no_face"] * 3
        assert "Traceback" not in server.log()
    finally:
        server.stop()
