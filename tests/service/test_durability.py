"""Concurrent clients (enrol, identify, delete) against a service that is SIGKILLed mid-load,
then restarted, on SQLite and on PostgreSQL. Checked over HTTP only: every acknowledged
enrolment is present exactly once and identified, every acknowledged delete stays deleted,
nothing appears that no client sent, and the index holds exactly what SQL holds."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from advplugin.protectors import create_protector
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of, template_env


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_clients_survive_sigkill(backend, key, tmp_path, make_server, request) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database(backend, tmp_path, request)
    server = make_server(template_env(url, tmp_path, key) | {"ADVPLUGIN_SNAPSHOT_EVERY": "7"})
    templates = protector.protect(np.random.default_rng(2).normal(size=(600, 128)).astype(np.float32))
    subjects = [f"e{i}" for i in range(len(templates))]

    lock = threading.Lock()
    acked: set[str] = set()  # enrolments acknowledged (201)
    sent: set[str] = set()  # enrolments sent (acknowledged or not)
    deleted: set[str] = set()  # deletes acknowledged (200)
    doubtful: set[str] = set()  # a delete in flight when the server died: either outcome is fine
    identified = [0]
    unexpected: list[int] = []  # any status a client should never see
    stop = threading.Event()

    def enroller(offset: int) -> None:
        with server.client() as c:
            for i in range(offset, len(subjects), 2):
                if stop.is_set():
                    return
                with lock:
                    sent.add(subjects[i])
                try:
                    r = c.post("/enroll/templates", json={"protection": prot, "items": [
                        {"subject": subjects[i], "template": templates[i].tolist()}]})
                except httpx.TransportError:
                    return
                if r.status_code == 201:
                    with lock:
                        acked.add(subjects[i])
                else:
                    unexpected.append(r.status_code)

    def deleter() -> None:
        with server.client() as c:
            while not stop.is_set():
                with lock:
                    candidates = sorted(acked - deleted - doubtful)
                if len(candidates) < 5:
                    time.sleep(0.01)
                    continue
                victim = candidates[len(candidates) // 2]
                with lock:
                    doubtful.add(victim)
                try:
                    r = c.delete(f"/subjects/{victim}")
                except httpx.TransportError:
                    return
                with lock:
                    if r.status_code == 200:
                        deleted.add(victim)
                    else:
                        unexpected.append(r.status_code)
                    doubtful.discard(victim)

    def identifier() -> None:
        with server.client() as c:
            while not stop.is_set():
                with lock:
                    known = sorted(acked)[:50]
                if not known:
                    time.sleep(0.01)
                    continue
                idx = [subjects.index(s) for s in known]
                try:
                    r = c.post("/identify/templates", json={"protection": prot, "templates": templates[idx].tolist()})
                except httpx.TransportError:
                    return
                if r.status_code != 200:
                    unexpected.append(r.status_code)
                identified[0] += 1

    workers = [threading.Thread(target=f, args=a) for f, a in
               ((enroller, (0,)), (enroller, (1,)), (deleter, ()), (identifier, ()))]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 90
    while (len(acked) < 80 or len(deleted) < 10) and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    for w in workers:
        w.join(30)
    print(f"durability/{backend}: {len(acked)} enrolments and {len(deleted)} deletes acknowledged, "
          f"{len(sent) - len(acked)} enrolments and {len(doubtful)} deletes in flight at SIGKILL, "
          f"{identified[0]} identify requests")
    assert len(acked) >= 80 and len(deleted) >= 10 and identified[0] > 0 and not unexpected

    server.start()
    with server.client() as c:
        listed = {s["subject"]: s["template_count"]
                  for s in c.get("/subjects", params={"size": 1000}).json()["subjects"]}
        must = acked - deleted - doubtful
        assert must <= set(listed)  # every acknowledged enrolment...
        assert all(n == 1 for n in listed.values())  # ...exactly once, nothing duplicated
        assert not set(listed) & deleted  # no acknowledged delete came back
        assert set(listed) <= sent  # nothing no client sent
        alive = sorted(listed)
        idx = [subjects.index(s) for s in alive]
        res = c.post("/identify/templates", json={"protection": prot, "templates": templates[idx].tolist()}).json()
        assert [r["subjects"][0]["subject"] for r in res["result"]] == alive
        st = c.get("/status").json()
        assert st["template_count"] == len(alive) == st["index"]["size"]  # index = SQL
