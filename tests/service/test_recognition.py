"""/enroll and /identify end to end over real HTTP, on SQLite and on PostgreSQL.

Full scale (protected-template mode): the first image of every lfw-dev identity with two or
more images is enrolled, all their other images identified; the HTTP rank-1 rate must equal
the offline rank-1 of the same scheme on the same (cached dlib) embeddings. The server runs
with no key at all. Image mode: a 16-identity subset goes through /enroll and /identify as
JPEGs (real dlib extraction in the server), compared with the offline number on the same
images, followed by a scan of everything the server wrote for the raw embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from advplugin.adapters import create_extractor
from advplugin.evaluation.metrics import rank1_identification
from advplugin.gallery import Gallery, make_engine
from advplugin.images import load_image
from advplugin.keys import load_key
from advplugin.protectors import create_protector
from tests.conftest import env_erasure_store, env_master_key
from tests.service.conftest import migrated_database
from tests.service.helpers import (
    assert_no_raw_bytes,
    example_client_module,
    files_blob,
    first_vs_rest,
    max_cosine,
    protection_of,
    vectors_in_blob,
)

BACKENDS = ["sqlite", "postgresql"]


def _report(line: str) -> None:
    """The two numbers, for the record (`pytest -s` or the -ra summary shows them)."""
    print(line)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_lfw_rank1_over_http_equals_offline_template_mode(
    backend, lfw_cache, key, tmp_path, make_server, request
) -> None:
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    g_idx, p_idx = first_vs_rest(identity, path)
    protector = create_protector("xnn", key=key, dim=128)  # the client's middleware
    gallery_t, probe_t = protector.protect(emb[g_idx]), protector.protect(emb[p_idx])
    offline = rank1_identification(
        protector.score(probe_t, gallery_t), identity[p_idx], identity[g_idx]
    )

    url = migrated_database(backend, tmp_path, request)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    })
    client = example_client_module().AdvpluginClient(server.url, server.api_key)
    prot = protection_of(protector)
    assert client.status()["key_id"] == key.key_id
    assert not any((d / "key").exists() for d in (tmp_path, tmp_path / "data"))  # template mode: the server has no key

    names = [str(identity[i]) for i in g_idx]
    for s in range(0, len(g_idx), 1000):
        out = client.enroll_templates(names[s : s + 1000], gallery_t[s : s + 1000], prot)
        assert [t["subject"] for t in out["templates"]] == names[s : s + 1000]
    top1 = []
    for s in range(0, len(p_idx), 1000):
        res = client.identify_templates(probe_t[s : s + 1000], prot)["result"]
        top1 += [r["subjects"][0]["subject"] for r in res]
    http = float(np.mean(np.array(top1) == identity[p_idx]))
    _report(f"templates/{backend}: {len(g_idx)} enrolled, {len(p_idx)} probes: "
                             f"HTTP rank-1 {http:.4%}, offline rank-1 {offline:.4%}")
    assert abs(http - offline) <= 0.001
    assert offline > 0.5  # sanity: a real recogniser, not chance
    st = client.status()
    assert st["template_count"] == len(g_idx) == st["index"]["size"]


@pytest.fixture(scope="session")
def lfw_subset(face_data):
    """16 identities (<= 3 images each): raw embeddings computed here with the server's own
    extractor code (largest face, as /enroll and /identify?limit=1 use)."""
    from advplugin.embedding_files import load_embedding_set

    cache = load_embedding_set(face_data / "lfw-dev-dlib128.npz")
    g_idx, p_idx = first_vs_rest(cache.identity, cache.path, max_identities=16, max_images=3)
    extractor = create_extractor("dlib")
    items = []
    for i in g_idx + p_idx:
        file = face_data / "lfw-dev" / str(cache.path[i])
        faces = extractor.extract(load_image(file), largest_only=True)
        raw = faces.embeddings[0] if len(faces.detections) else None
        items.append((i in g_idx, str(cache.identity[i]), file, raw))
    return items


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_lfw_subset_with_images_and_raw_embedding_scan(
    backend, lfw_subset, key_file, tmp_path, make_server, request
) -> None:
    kpath, key = key_file
    protector = create_protector("xnn", key=load_key(kpath), dim=128)
    url = migrated_database(backend, tmp_path, request)
    data_dir = tmp_path / "data"
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(data_dir),
        "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn",
    })
    client = example_client_module().AdvpluginClient(server.url, server.api_key)

    usable = [it for it in lfw_subset if it[3] is not None]
    gallery = [it for it in usable if it[0]]
    probes = [it for it in usable if not it[0]]
    for _, name, file, _ in gallery:
        assert len(client.enroll(name, file.read_bytes())["templates"]) == 1
    top1 = [
        client.identify(file.read_bytes(), limit=1)["result"][0]["subjects"][0]["subject"]
        for _, _, file, _ in probes
    ]
    gal_t = protector.protect(np.stack([it[3] for it in gallery]))
    prb_t = protector.protect(np.stack([it[3] for it in probes]))
    offline = rank1_identification(
        protector.score(prb_t, gal_t), np.array([it[1] for it in probes]), np.array([it[1] for it in gallery])
    )
    http = float(np.mean(np.array(top1) == np.array([it[1] for it in probes])))
    _report(f"images/{backend}: {len(gallery)} enrolled, {len(probes)} probes: "
                             f"HTTP rank-1 {http:.4%}, offline rank-1 {offline:.4%}")
    assert abs(http - offline) <= 0.001

    # --- scan everything the server wrote for the raw embeddings of these images ---------------
    raws = np.stack([it[3] for it in usable]).astype(np.float64)
    server.stop()  # flushes the FAISS snapshot and the SQLite WAL
    with Gallery.open(url, master_key=env_master_key(), erasure=env_erasure_store()) as g:
        stored = np.concatenate([b.vectors for b in g.iter_templates()])
    assert len(stored) == len(gallery)
    # Control: the stored templates are the protected ones...
    np.testing.assert_allclose(stored, gal_t, atol=1e-5)
    # ...and none is close to any raw embedding.
    assert max_cosine(stored, raws) < 0.99

    snapshot = files_blob(*sorted((data_dir / "index").glob("*.npz")))
    logs = server.log().encode()
    blobs = {"FAISS snapshot": snapshot, "server log": logs}
    if backend == "sqlite":
        db_file = tmp_path / "gallery.db"
        blobs["SQLite file"] = files_blob(db_file, Path(f"{db_file}-wal"))
    else:
        engine = make_engine(url)
        with engine.connect() as conn:
            tables = [r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))]
            dump = b""
            for t in tables:
                for row in conn.execute(text(f'SELECT * FROM "{t}"')):
                    dump += b"|".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
        engine.dispose()
        blobs["PostgreSQL tables"] = dump
    for where, blob in blobs.items():
        assert_no_raw_bytes(blob, raws, where)
        found = vectors_in_blob(blob, 128)
        if len(found):
            assert max_cosine(found, raws) < 0.99, where
    # Controls that the scans can fail: the scanner finds the protected vectors in their
    # plaintext bytes, and a raw vector is detected. Sealed storage (the default,
    # docs/sealed-storage.md) leaves not even the protected vectors in SQL or the snapshot.
    db_blob = blobs.get("SQLite file", blobs.get("PostgreSQL tables"))
    assert len(vectors_in_blob(np.asarray(gal_t, "<f4").tobytes(), 128)) >= len(gallery)
    assert len(vectors_in_blob(db_blob, 128)) == 0
    assert len(vectors_in_blob(snapshot, 128)) == 0
    with pytest.raises(AssertionError):
        assert_no_raw_bytes(b"x" + raws[0].astype("<f4").tobytes(), raws, "control")
    import base64

    secret_b64 = base64.b64encode(key.secret)
    for blob in (logs, snapshot, db_blob):
        assert key.secret not in blob and secret_b64 not in blob
