"""A key rotation on a live service, over real HTTP, on SQLite and on PostgreSQL.

The operator's procedure of docs/migration.md ("Rotating a live service"): the service runs
with K1; it is restarted with the new key K2 and the previous key K1; `advplugin rotate-key`
re-keys the gallery chunk by chunk while the service answers; afterwards K1 is not needed.
Identification answers (real JPEGs through /identify and /verify, and client-protected
templates through /identify/templates) must be the same before, during and after, and a
service started with one key only must refuse a half-rotated gallery, saying what to do.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from advplugin.bulk import rotate_key
from advplugin.cli.main import main
from advplugin.gallery import Gallery
from advplugin.keys import write_key
from advplugin.protectors import create_protector
from tests.conftest import env_erasure_store, env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of

N_PEOPLE, N_DISTRACTORS, N_IMAGES = 200, 300, 3


def _lfw_split(cache):
    """Gallery: first image of people with >= 2 images, plus single-image distractors;
    probes: their second image."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i in np.argsort(cache["path"], kind="stable"):
        by_subject[str(cache["identity"][i])].append(int(i))
    multi = [v for v in by_subject.values() if len(v) >= 2][:N_PEOPLE]
    single = [v[0] for v in by_subject.values() if len(v) == 1][:N_DISTRACTORS]
    return [v[0] for v in multi] + single, [v[1] for v in multi]


def _stop_after(n: int):
    def stop(chunks: int, rotated: int) -> None:
        if chunks == n:
            raise KeyboardInterrupt  # what Ctrl-C does to `advplugin rotate-key`

    return stop


def _serve_args(url: str, data_dir, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`advplugin serve` that is expected to refuse to start (exits before binding)."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "advplugin.service", "--database-url", url, "--data-dir", str(data_dir)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )


class Answers:
    """What the service answers for the same probes, in a comparable form."""

    def __init__(self, client, images: list[bytes], verify: list[tuple[str, bytes]]) -> None:
        self.client, self.images, self.verify_items = client, images, verify

    def images_now(self) -> list[tuple[list[str], list[float]]]:
        out = []
        for img in self.images:
            r = self.client.post("/identify", params={"prediction_count": 3, "limit": 1},
                                 files={"file": ("p.jpg", img, "image/jpeg")})
            assert r.status_code == 200, r.text
            subs = r.json()["result"][0]["subjects"]
            out.append(([s["subject"] for s in subs], [s["similarity"] for s in subs]))
        for name, img in self.verify_items:
            r = self.client.post("/verify", data={"subject": name}, files={"file": ("p.jpg", img, "image/jpeg")})
            assert r.status_code == 200, r.text
            out.append(([name], [r.json()["similarity"]]))
        return out

    def templates_now(self, probes: np.ndarray, prot: dict) -> list[tuple[list[str], list[float]]]:
        r = self.client.post("/identify/templates", json={
            "protection": prot, "templates": probes.tolist(), "prediction_count": 3})
        assert r.status_code == 200, r.text
        return [([s["subject"] for s in res["subjects"]], [s["similarity"] for s in res["subjects"]])
                for res in r.json()["result"]]


def _same(a, b) -> None:
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, sims_a), (_, sims_b) in zip(a, b, strict=True):
        np.testing.assert_allclose(sims_a, sims_b, atol=1e-4)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_live_rotation_over_http(backend, lfw_cache, face_data, tmp_path, make_server, request) -> None:
    k1_path, k2_path = tmp_path / "k1.key", tmp_path / "k2.key"
    k1, k2 = write_key(k1_path), write_key(k2_path)
    p1, p2 = (create_protector("xnn", key=k, dim=128) for k in (k1, k2))
    emb, identity = lfw_cache["embedding"], lfw_cache["identity"]
    enrol, probe_rows = _lfw_split(lfw_cache)
    truth = [str(identity[i]) for i in probe_rows]
    images = [(face_data / "lfw-dev" / str(lfw_cache["path"][i])).read_bytes() for i in probe_rows[:N_IMAGES]]
    url = migrated_database(backend, tmp_path, request)
    data_dir = tmp_path / "data"

    # -- before: the service runs with K1 ---------------------------------------------------
    server = make_server({"ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(data_dir),
                          "ADVPLUGIN_KEY_FILE": str(k1_path), "ADVPLUGIN_SCHEME": "xnn"})
    with server.client() as c:
        names = [str(identity[i]) for i in enrol]
        r = c.post("/enroll/templates", json={"protection": protection_of(p1), "items": [
            {"subject": n, "template": t.tolist()} for n, t in zip(names, p1.protect(emb[enrol]), strict=True)]})
        assert r.status_code == 201, r.text
        ask = Answers(c, images, [(truth[0], images[0])])
        before_img = ask.images_now()
        before_tpl = ask.templates_now(p1.protect(emb[probe_rows]), protection_of(p1))
    rank1 = np.mean([a[0][0] == t for a, t in zip(before_tpl, truth, strict=True)])
    assert rank1 > 0.8  # a real recogniser: the comparisons below are meaningful
    assert [a[0][0] for a in before_img[:N_IMAGES]] == truth[:N_IMAGES]

    # -- a rotation started while a one-key service runs: it refuses to answer (503) ----------
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
        with pytest.raises(KeyboardInterrupt):
            rotate_key(g, k1, k2, chunk_size=100, on_chunk=_stop_after(2))
        assert g.count_templates(key_id=k2.key_id) == 200
    with server.client() as c:
        r = c.post("/identify", files={"file": ("p.jpg", images[0], "image/jpeg")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "key_rotation"
        assert "ADVPLUGIN_PREVIOUS_KEY_FILE" in r.json()["error"]["message"]
        st = c.get("/status").json()
        assert {(k["key_id"], k["role"]) for k in st["keys"]} == {(k1.key_id, "current"), (k2.key_id, "unknown")}

    # -- restarting with one key only, mid-rotation: refused, saying what to do ----------------
    for only in (k1_path, k2_path):
        r = _serve_args(url, tmp_path / "refused", {"ADVPLUGIN_KEY_FILE": str(only), "ADVPLUGIN_SCHEME": "xnn"})
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        for must in (k1.key_id, k2.key_id, "ADVPLUGIN_PREVIOUS_KEY_FILE", "advplugin rotate-key"):
            assert must in r.stderr

    # -- during: restarted with the new key and the previous one ------------------------------
    server.env.update(ADVPLUGIN_KEY_FILE=str(k2_path), ADVPLUGIN_PREVIOUS_KEY_FILE=str(k1_path))
    server.restart()
    assert "serving during a key rotation" in server.log()
    with server.client() as c:
        ask.client = c
        st = c.get("/status").json()
        assert st["key_id"] == k2.key_id and st["previous_key_id"] == k1.key_id
        counts = {k["key_id"]: (k["role"], k["template_count"]) for k in st["keys"]}
        assert counts == {k2.key_id: ("current", 200), k1.key_id: ("previous", len(enrol) - 200)}
        _same(ask.images_now(), before_img)
        _same(ask.templates_now(p2.protect(emb[probe_rows]), protection_of(p2)), before_tpl)
        # Enrolment uses the new key only.
        r = c.post("/enroll", data={"subject": "Newcomer"}, files={"file": ("p.jpg", images[1], "image/jpeg")})
        assert r.status_code == 201, r.text
        new_id = r.json()["templates"][0]["template_id"]
        with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
            assert g.template_rows([new_id])[new_id].key_id == k2.key_id
        # Templates under the retiring key are refused at the door (they would be ambiguous).
        r = c.post("/identify/templates", json={"protection": protection_of(p1), "templates": [[0.1] * 128]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_key"
        assert c.delete("/subjects/Newcomer").status_code == 200

        # More chunks rotated by another process while this service answers.
        with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
            with pytest.raises(KeyboardInterrupt):
                rotate_key(g, k1, k2, chunk_size=100, on_chunk=_stop_after(1))
        _same(ask.images_now(), before_img)
        _same(ask.templates_now(p2.protect(emb[probe_rows]), protection_of(p2)), before_tpl)

    # -- after: the rotation finishes (the real command) while the service runs ----------------
    assert main(["rotate-key", "--gallery", url, "--old-key", str(k1_path), "--new-key", str(k2_path),
                 "--no-progress"]) == 0
    with server.client() as c:
        ask.client = c
        _same(ask.images_now(), before_img)
        _same(ask.templates_now(p2.protect(emb[probe_rows]), protection_of(p2)), before_tpl)
        st = c.get("/status").json()
        assert st["previous_key_id"] is None
        assert st["keys"] == [{"key_id": k2.key_id, "role": "current", "template_count": len(enrol)}]
        # The old key no longer matches: probes protected with K1 (say, by someone who kept
        # it) find the wrong people.
        stale = ask.templates_now(p1.protect(emb[probe_rows]), protection_of(p2))
        assert np.mean([a[0][0] == t for a, t in zip(stale, truth, strict=True)]) < 0.05
    assert "key rotation finished" in server.log()

    # -- and the old key file is not needed any more --------------------------------------------
    k1_path.unlink()
    server.env.pop("ADVPLUGIN_PREVIOUS_KEY_FILE")
    server.restart()
    with server.client() as c:
        ask.client = c
        _same(ask.images_now(), before_img)


def test_template_mode_during_rotation_says_what_to_do(lfw_cache, tmp_path, make_server, request) -> None:
    """Template mode holds no key: it cannot match a half-rotated gallery, so it answers 503
    and refuses to start, then serves the new key id once the rotation is done."""
    k1_path, k2_path = tmp_path / "k1.key", tmp_path / "k2.key"
    k1, k2 = write_key(k1_path), write_key(k2_path)
    p1, p2 = (create_protector("xnn", key=k, dim=128) for k in (k1, k2))
    emb, identity = lfw_cache["embedding"][:300], [str(s) for s in lfw_cache["identity"][:300]]
    url = migrated_database("sqlite", tmp_path, request)
    env = {"ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
           "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
           "ADVPLUGIN_TEMPLATE_KEY_ID": k1.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128"}
    server = make_server(env)
    with server.client() as c:
        r = c.post("/enroll/templates", json={"protection": protection_of(p1), "items": [
            {"subject": n, "template": t.tolist()} for n, t in zip(identity, p1.protect(emb), strict=True)]})
        assert r.status_code == 201
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g, pytest.raises(KeyboardInterrupt):
        rotate_key(g, k1, k2, chunk_size=100, on_chunk=_stop_after(1))
    with server.client() as c:
        r = c.post("/identify/templates", json={"protection": protection_of(p1), "templates": p1.protect(emb[:2]).tolist()})
        assert r.status_code == 503
        assert "ADVPLUGIN_TEMPLATE_KEY_ID" in r.json()["error"]["message"]
    server.stop()
    r = _serve_args(url, tmp_path / "data", {k: v for k, v in env.items() if k != "ADVPLUGIN_DATABASE_URL"})
    assert r.returncode == 2 and "Template mode holds no key" in r.stderr
    assert main(["rotate-key", "--gallery", url, "--old-key", str(k1_path), "--new-key", str(k2_path),
                 "--no-progress"]) == 0
    server.env["ADVPLUGIN_TEMPLATE_KEY_ID"] = k2.key_id
    server.start()
    with server.client() as c:
        r = c.post("/identify/templates", json={"protection": protection_of(p2), "templates": p2.protect(emb[:20]).tolist()})
        assert r.status_code == 200
        assert [res["subjects"][0]["subject"] for res in r.json()["result"]] == identity[:20]
