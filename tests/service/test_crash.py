"""SIGKILL in the middle of a stream of enrolls and deletes, then restart: every acknowledged
enrolment is searchable, no acknowledged delete comes back, and SQL and index agree."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.gallery.snapshot import open_snapshot
from advplugin.protectors import create_protector
from tests.conftest import env_erasure_store, env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import INDEXES, index_env, protection_of, template_env


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_stream(backend, index, key, tmp_path, make_server, request) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database(backend, tmp_path, request)
    env = template_env(url, tmp_path, key) | index_env(index) | {"ADVPLUGIN_SNAPSHOT_EVERY": "7"}
    server = make_server(env)
    templates = protector.protect(np.random.default_rng(1).normal(size=(400, 128)).astype(np.float32))

    acked: dict[str, np.ndarray] = {}  # subject -> its template, enrolment acknowledged
    deleted: list[str] = []  # deletes acknowledged
    unknown: set[str] = set()  # a delete in flight when the server died: either outcome is fine
    stop = threading.Event()

    def stream() -> None:
        with server.client() as c:
            for i, t in enumerate(templates):
                if stop.is_set():
                    return
                try:
                    if i % 5 == 4 and acked:
                        victim = sorted(set(acked) - set(deleted))[0]
                        unknown.add(victim)
                        if c.delete(f"/subjects/{victim}").status_code == 200:
                            deleted.append(victim)
                        unknown.discard(victim)
                        continue
                    r = c.post("/enroll/templates", json={
                        "protection": prot, "items": [{"subject": f"s{i}", "template": t.tolist()}]})
                    if r.status_code == 201:
                        acked[f"s{i}"] = t
                except httpx.TransportError:
                    return  # the server died under this request: outcome unknown, not asserted

    worker = threading.Thread(target=stream)
    worker.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    worker.join(30)
    assert len(acked) >= 60 and deleted

    server.start()
    alive = sorted(set(acked) - set(deleted) - unknown)
    with server.client() as c:
        vecs = np.stack([acked[s] for s in alive])
        res = c.post("/identify/templates", json={"protection": prot, "templates": vecs.tolist()}).json()
        top = [(r["subjects"][0]["subject"], r["subjects"][0]["similarity"]) for r in res["result"]]
        assert [s for s, _ in top] == alive
        assert min(sim for _, sim in top) > 0.999
        gone = np.stack([acked[s] for s in deleted])
        res = c.post("/identify/templates", json={
            "protection": prot, "templates": gone.tolist(), "prediction_count": 5}).json()
        returned = {m["subject"] for r in res["result"] for m in r["subjects"]}
        assert not returned & set(deleted)
        for s in deleted:
            assert c.get(f"/subjects/{s}").status_code == 404
        st = c.get("/status").json()
        assert st["template_count"] == st["index"]["size"]
    server.stop()  # graceful: writes the final snapshot

    # SQL and the persisted index hold exactly the same ids.
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
        sql_ids = np.sort(np.concatenate([b.ids for b in g.iter_templates()]))
        sql_names = {s.name for s in g.list_subjects(limit=10_000)}
        sealer = g.snapshot_sealer()  # the snapshot is sealed like the gallery
    assert set(alive) <= sql_names and not sql_names & set(deleted)
    if index == "milvus":  # its state lives in Milvus (its snapshot file is a handle): /status agreed above
        return
    (snap,) = (tmp_path / "data" / "index").glob("*.npz")
    _, index = open_snapshot(snap, sealer=sealer)
    np.testing.assert_array_equal(index.ids(), sql_ids)
