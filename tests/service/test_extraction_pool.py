"""Extraction in worker processes answers exactly as in the serving process (same boxes, same
protected templates), reports unusable images the same way, and recovers from a worker that
dies. Over HTTP: a service with workers serves /enroll and /identify."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from advplugin.images import ImageError
from advplugin.service.errors import ServiceError
from advplugin.service.extraction import Extraction
from advplugin.service.protection import KeyView, Protection
from advplugin.settings import Settings
from tests.service.conftest import Server, migrated_database


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    tmp = tmp_path_factory.mktemp("pool")
    return Settings(data_dir=tmp, key_file=tmp / "key", scheme="xnn", extraction_workers=2)


@pytest.fixture(scope="module")
def protection(settings: Settings) -> Protection:
    return Protection.from_settings(settings, create_key=True)  # the key file the workers read


@pytest.fixture(scope="module")
def images(face_data: Path) -> list[bytes]:
    files = sorted((face_data / "lfw-dev").glob("A*/*.jpg"))[:4]
    return [f.read_bytes() for f in files]


@pytest.fixture(scope="module")
def pool(settings: Settings, protection: Protection) -> Iterator[Extraction]:
    """Two worker processes (starting them costs seconds: shared by the tests)."""
    extraction = Extraction(protection, settings)
    yield extraction
    extraction.close()


def _view(protection: Protection) -> KeyView:
    return KeyView(current=protection.expected.key_id, previous=None, unknown=[])


def test_workers_answer_exactly_as_in_process(settings, protection, pool, images) -> None:
    local = Extraction(protection, settings.model_copy(update={"extraction_workers": 0}))
    assert local._pool is None and pool._pool is not None
    view = _view(protection)
    found = 0
    for data in images:
        for largest_only in (True, False):
            a_det, a_probes = local.faces(data, view, largest_only=largest_only, max_faces=20)
            b_det, b_probes = pool.faces(data, view, largest_only=largest_only, max_faces=20)
            np.testing.assert_array_equal(a_det.boxes, b_det.boxes)
            np.testing.assert_array_equal(a_det.scores, b_det.scores)
            assert a_probes.keys() == b_probes.keys()
            for k in a_probes:
                np.testing.assert_allclose(a_probes[k], b_probes[k], atol=1e-6)
            found += len(a_det)
    assert found >= len(images)  # faces were found, so templates were compared
    for ext in (local, pool):
        with pytest.raises(ImageError, match="not a recognised image"):
            ext.faces(b"not an image", view, largest_only=True, max_faces=1)


def test_a_dead_worker_is_replaced(protection, pool, images) -> None:
    view = _view(protection)
    pool.faces(images[0], view, largest_only=True, max_faces=1)
    for pid in list(pool._pool._processes):  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
    answers = []
    for _ in range(3):  # the request that met the dead pool is a 503; later ones work
        try:
            det, _ = pool.faces(images[0], view, largest_only=True, max_faces=1)
            answers.append(len(det))
        except ServiceError as e:
            assert e.status == 503 and e.headers and "retry-after" in e.headers
            answers.append(None)
    assert answers[-1] == 1


def test_service_with_worker_processes(tmp_path: Path, images) -> None:
    url = migrated_database("sqlite", tmp_path, None)  # type: ignore[arg-type]
    server = Server(tmp_path, {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_SCHEME": "xnn", "ADVPLUGIN_EXTRACTION_WORKERS": "1",
    }).start()
    try:
        with server.client() as c:
            r = c.post("/enroll", files={"file": ("a.jpg", images[0])}, data={"subject": "A"})
            assert r.status_code == 201, r.text
            r = c.post("/identify", files={"file": ("a.jpg", images[0])})
            assert r.status_code == 200 and r.json()["result"][0]["subjects"][0]["subject"] == "A"
            assert r.json()["result"][0]["subjects"][0]["similarity"] > 0.999
            r = c.post("/identify", files={"file": ("a.jpg", b"garbage")})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image"
    finally:
        server.stop()
    assert "Traceback" not in server.log()
