"""Subjects over HTTP; deleting one removes it from SQL, the index and results, for good."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.protectors import create_protector
from tests.conftest import env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import INDEXES, index_env, protection_of, template_env


def _top1(client, t: np.ndarray, prot: dict) -> list[str | None]:
    res = client.post("/identify/templates", json={"protection": prot, "templates": t.tolist()}).json()
    return [r["subjects"][0]["subject"] if r["subjects"] else None for r in res["result"]]


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_delete_subject_everywhere_and_after_restart(backend, index, key, tmp_path, make_server, request) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database(backend, tmp_path, request)
    server = make_server(template_env(url, tmp_path, key) | index_env(index))
    t = protector.protect(np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32))
    names = ["Ann", "Ann", "Bob", "Cy", "Dee"]
    with server.client() as c:
        r = c.post("/enroll/templates", json={"protection": prot, "items": [
            {"subject": n, "template": v.tolist()} for n, v in zip(names, t, strict=True)]})
        assert r.status_code == 201
        page0 = c.get("/subjects", params={"page": 0, "size": 3}).json()
        page1 = c.get("/subjects", params={"page": 1, "size": 3}).json()
        assert page0["total"] == 4 and [s["subject"] for s in page0["subjects"] + page1["subjects"]] == [
            "Ann", "Bob", "Cy", "Dee"]
        assert c.get("/subjects/Ann").json()["template_count"] == 2
        assert _top1(c, t[:2], prot) == ["Ann", "Ann"]

        r = c.delete("/subjects/Ann")
        assert r.status_code == 200 and r.json() == {"subject": "Ann", "deleted_templates": 2}
        assert "Ann" not in _top1(c, t[:2], prot)
        assert c.get("/subjects/Ann").status_code == 404
        assert c.delete("/subjects/Ann").status_code == 404
        st = c.get("/status").json()
        assert st["template_count"] == 3 == st["index"]["size"]
        # A new gallery is sealed, with erasure keys outside the database (ids only, no paths).
        assert st["storage"]["sealed"] and st["storage"]["erasure_keys"] and not st["storage"]["converting"]
        assert st["storage"]["master_key_ids"] == [env_master_key().key_id]

    with Gallery.open(url) as g:
        assert g.count_templates() == 3 and "Ann" not in [s.name for s in g.list_subjects()]

    # Graceful restart (snapshot path) on SQLite; SIGKILL + restart (replay path) on both.
    for how in ("restart", "kill") if backend == "sqlite" else ("kill",):
        if how == "kill":
            server.kill()
            server.start()
        else:
            server.restart()
        with server.client() as c:
            assert "Ann" not in _top1(c, t[:2], prot), how
            assert _top1(c, t[2:], prot) == ["Bob", "Cy", "Dee"], how
            st = c.get("/status").json()
            assert st["template_count"] == 3 == st["index"]["size"], how
