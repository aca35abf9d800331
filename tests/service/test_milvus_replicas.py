"""Service replicas on the milvus index backend: two `python -m advplugin.service` processes on
one PostgreSQL, an enrolment on one identified by the other within the staleness bound
(`index.sync_interval`), deletions honoured and restarts replayed.

Two deployments:
- one shared Milvus: both replicas use the same Milvus endpoint and so the same collection
  (named after the gallery). No Milvus server image can run here, so the endpoint is
  milvus-lite's own gRPC server (`python -m milvus_lite server`), which speaks the Milvus
  protocol to pymilvus exactly as a standalone server does;
- the default, milvus-lite embedded in each replica (`<data_dir>/milvus.db`, one process per
  folder): each replica's change-log follower keeps its own copy in step with PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.protectors import create_protector
from tests.service.conftest import free_port, migrated_database
from tests.service.helpers import protection_of

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

#: The staleness bound the test states and checks: a replica's search started this long after
#: another replica's write response sees the write.
SYNC_INTERVAL = 0.5


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[str]:
    """A Milvus gRPC endpoint in its own process (milvus-lite's server), as `http://host:port`."""
    port = free_port()
    log = open(tmp_path / "milvus.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus-server"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited: {(tmp_path / 'milvus.log').read_text()[-2000:]}")
        try:
            MilvusClient(uri=uri, timeout=2).list_collections()
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    yield uri
    proc.terminate()
    proc.wait(30)


def _env(url: str, data_dir: Path, key, milvus_uri: str | None) -> dict[str, str]:
    env = {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(data_dir),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
        "ADVPLUGIN_INDEX__BACKEND": "milvus", "ADVPLUGIN_INDEX__SYNC_INTERVAL": str(SYNC_INTERVAL),
    }
    if milvus_uri:
        env["ADVPLUGIN_INDEX__MILVUS_URI"] = milvus_uri
    return env


def _top1(client: httpx.Client, t: np.ndarray, prot: dict) -> list[str | None]:
    r = client.post("/identify/templates", json={"protection": prot, "templates": t.tolist()})
    assert r.status_code == 200, r.text
    return [x["subjects"][0]["subject"] if x["subjects"] else None for x in r.json()["result"]]


def _enroll(client: httpx.Client, names: list[str], t: np.ndarray, prot: dict) -> None:
    items = [{"subject": n, "template": v.tolist()} for n, v in zip(names, t, strict=True)]
    r = client.post("/enroll/templates", json={"protection": prot, "items": items})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("shared", [True, False], ids=["one-milvus-server", "milvus-lite-per-replica"])
def test_enrolment_on_one_replica_is_identified_by_the_other(
    shared, key, tmp_path, make_server, request
) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    url = migrated_database("postgresql", tmp_path, request)
    uri = request.getfixturevalue("milvus_server") if shared else None
    a = make_server(_env(url, tmp_path / "a" / "data", key, uri), tmp_path / "a")
    b = make_server(_env(url, tmp_path / "b" / "data", key, uri), tmp_path / "b")
    t = protector.protect(np.random.default_rng(1).normal(size=(6, 128)).astype(np.float32))

    with a.client() as ca, b.client(a.api_key) as cb:  # the gallery keeps the first key
        _enroll(ca, ["Ann", "Bob", "Cy"], t[:3], prot)
        assert _top1(ca, t[:3], prot) == ["Ann", "Bob", "Cy"]  # own writes: at once
        time.sleep(SYNC_INTERVAL)
        assert _top1(cb, t[:3], prot) == ["Ann", "Bob", "Cy"]  # the other's: within the bound

        # A deletion on b, seen by a within the bound; an enrolment on b seen by a.
        assert cb.delete("/subjects/Bob").status_code == 200
        _enroll(cb, ["Dee"], t[3:4], prot)
        assert "Bob" not in _top1(cb, t[1:2], prot)
        time.sleep(SYNC_INTERVAL)
        assert _top1(ca, t[[0, 1, 3]], prot)[::2] == ["Ann", "Dee"]
        assert "Bob" not in _top1(ca, t[1:2], prot)
        for c in (ca, cb):
            st = c.get("/status").json()
            assert st["template_count"] == 3 == st["index"]["size"]

    # a is killed; b writes meanwhile; a's restart replays what it missed (snapshot handle +
    # change log), deleted templates stay deleted.
    a.kill()
    with b.client(a.api_key) as cb:
        _enroll(cb, ["Eve"], t[4:5], prot)
        assert cb.delete("/subjects/Cy").status_code == 200
    a.start()
    with a.client() as ca:
        assert _top1(ca, t[[0, 4]], prot) == ["Ann", "Eve"]
        assert not {"Bob", "Cy"} & set(_top1(ca, t[1:3], prot))
        assert ca.get("/status").json()["index"]["size"] == 3

    with Gallery.open(url) as g:
        assert g.count_templates() == 3

    if shared:  # both replicas searched ONE collection: the gallery's alias, nothing else
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri)
        aliases = client.list_aliases()["aliases"]
        assert len(aliases) == 1 and aliases[0].startswith("advplugin_")
        assert client.list_collections() == [client.describe_alias(aliases[0])["collection_name"]]
    else:  # each replica kept its own embedded copy in its data folder
        assert (tmp_path / "a" / "data" / "milvus.db").is_dir()
        assert (tmp_path / "b" / "data" / "milvus.db").is_dir()
