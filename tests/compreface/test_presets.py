"""`advplugin migrate --from-compreface` / `--from-deepface` on databases built in the real
PostgreSQL from the projects' published DDL (tests/compreface/schemas.py), filled with the
lfw-dev dlib embeddings: one command migrates, verifies (agreement printed) and, only after a
passing verify, purges the raw vectors; the CompreFace SDK then recognises those people
through advplugin with the CompreFace API key it already had.
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from advplugin.cli.main import main
from advplugin.gallery.apikeys import hash_api_key
from tests.compreface.conftest import run_sdk
from tests.compreface.schemas import CALCULATOR, build_compreface, build_deepface
from tests.service.helpers import first_vs_rest


def _count(url: str, sql: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = int(conn.exec_driver_sql(sql).scalar_one())
    engine.dispose()
    return n


def _rows(url: str, sql: str) -> list[tuple]:
    """Rows read with plain SQL (names, counts and key hashes are not sealed)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.exec_driver_sql(sql)]
    engine.dispose()
    return rows


def _templates(url: str, collection: str) -> int:
    return _rows(url, "SELECT count(*) FROM templates t JOIN collections c ON c.id = t.collection_id "
                      f"WHERE c.name = '{collection}'")[0][0]


def _agreement(out: str) -> float:
    m = re.search(r"rank-1 identity agreement raw vs protected: ([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


@pytest.mark.slow
def test_compreface_database_migrates_purges_and_the_sdk_recognises_through_advplugin(
    lfw_cache, face_data, new_pg_database, key_file, tmp_path, capsys, make_server, sdk_python
) -> None:
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    # Held out: one later image of each of 8 identities with >= 2 images (the probes).
    _, later = first_vs_rest(identity, path, max_identities=8, max_images=2)
    held = set(later)
    rows = [i for i in range(len(emb)) if i not in held]
    big, small = rows[:6000], rows[6000:6400]  # two recognition services (API keys)
    key_a, key_b = str(uuid.uuid4()), str(uuid.uuid4())
    src = new_pg_database()
    image_ids = build_compreface(src, [
        ("Office", key_a, [str(identity[i]) for i in big], emb[big]),
        ("Lab", key_b, [str(identity[i]) for i in small], emb[small]),
    ])
    assert _count(src, "SELECT count(*) FROM embedding") == len(big) + len(small) >= 5000

    kpath, _ = key_file
    gallery = f"sqlite:///{tmp_path / 'gallery.db'}"
    args = ["migrate", "--from-compreface", src, "--to", gallery, "--scheme", "xnn", "--key", str(kpath),
            "--extractor", "dlib", "--upgrade", "--no-progress", "--verify", "--purge-source",
            "--verify-samples", "500"]
    # A verify that cannot pass: nothing is purged.
    assert main([*args, "--min-agreement", "1.01"]) == 1
    out = capsys.readouterr().out
    assert out.count("purge: NOT done") == 2
    assert _count(src, "SELECT count(*) FROM embedding") == len(big) + len(small)
    # The same command, resumed: the jobs are done, verify passes, the raw vectors go.
    assert main(args) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"made by: {CALCULATOR}" in out
    agreements = [_agreement(block) for block in out.split("source: ")[1:]]
    assert len(agreements) == 2 and min(agreements) >= 0.99
    assert out.count("purge: deleted") == 2
    assert _count(src, "SELECT count(*) FROM embedding") == 0
    assert _count(src, "SELECT count(*) FROM img") == 0
    assert _count(src, "SELECT count(*) FROM subject") > 0  # names are not biometric: kept
    for k in (key_a, key_b):  # API keys are credentials: not even a part of one is printed
        assert k[:8] not in out and k.split("-")[-1] not in out

    assert _templates(gallery, "Office") == len(big) and _templates(gallery, "Lab") == len(small)
    keys = dict(_rows(gallery, "SELECT k.key_sha256, c.name FROM api_keys k JOIN collections c "
                               "ON c.id = k.collection_id WHERE k.revoked_at IS NULL"))
    assert keys[hash_api_key(key_a)] == "Office" and keys[hash_api_key(key_b)] == "Lab"

    # -- the CompreFace SDK, with the CompreFace API key, against advplugin ------------------------
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": gallery, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn",
    })
    probes = [str(face_data / "lfw-dev" / str(path[i])) for i in later]
    truth = [str(identity[i]) for i in later]
    # a kept CompreFace image id (embedding id) of each probe's person, for verify-by-image-id
    first_row = {str(identity[i]): n for n, i in enumerate(big)}
    known = [(p, t) for p, t in zip(probes, truth, strict=True) if t in first_row]
    same = [(p, image_ids[key_a][first_row[t]]) for p, t in known]
    other = [(p, image_ids[key_a][first_row[known[(j + 1) % len(known)][1]]]) for j, (p, _) in enumerate(known)]
    pairs = same + other
    res = run_sdk(sdk_python, "recognize", {"port": server.port, "api_key": key_a, "probes": probes,
                                             "verify_pairs": pairs}, tmp_path)
    assert res["list"]["total_elements"] == len(big)
    client = server.client(api_key=key_a)
    sdk_top, native_top = [], []
    for p, r in zip(probes, res["recognize"], strict=True):
        with open(p, "rb") as f:
            native = client.post("/identify", params={"limit": 1}, files={"file": f})
        if native.status_code == 422:  # no face for dlib: CompreFace's code 28 through the SDK
            assert r["code"] == 28
            sdk_top.append(None)
            native_top.append(None)
            continue
        sdk_top.append(r["result"][0]["subjects"][0]["subject"])
        native_top.append(native.json()["result"][0]["subjects"][0]["subject"])
    assert sdk_top == native_top
    rank1 = float(np.mean([s == t for s, t in zip(sdk_top, truth, strict=True)]))
    print(f"migrated CompreFace gallery: SDK rank-1 on {len(probes)} held-out lfw-dev images {rank1:.2%}")
    assert rank1 > 0.5
    # verify by a CompreFace image id (the embedding's UUID, kept through the migration)
    sims = [v["result"][0]["similarity"] if "result" in v else None for v in res["verify"]]
    pairs_ok = [(a, b) for a, b in zip(sims[: len(same)], sims[len(same):], strict=True) if a is not None]
    assert len(pairs_ok) >= 4
    assert np.mean([a > b for a, b in pairs_ok]) >= 0.75  # the same person scores above another


@pytest.mark.slow
@pytest.mark.parametrize("pgvector_standin", [False, True], ids=["float8-array", "pgvector-text"])
def test_deepface_table_migrates_verifies_and_purges(
    lfw_cache, new_pg_database, key_file, tmp_path, capsys, pgvector_standin
) -> None:
    emb, identity, path = lfw_cache["embedding"], lfw_cache["identity"], lfw_cache["path"]
    n = 5000 if not pgvector_standin else 1000
    img_names = [f"/data/db/{p}" for p in path[:n]]  # deepface's img_name: the registered file
    src = new_pg_database()
    table = build_deepface(src, img_names, emb[:n], pgvector_standin=pgvector_standin)
    kpath, _ = key_file
    gallery = f"sqlite:///{tmp_path / 'gallery.db'}"
    assert main(["migrate", "--from-deepface", src, "--to", gallery, "--collection", "people",
                 "--scheme", "xnn", "--key", str(kpath), "--extractor", "dlib", "--upgrade", "--no-progress",
                 "--verify", "--purge-source", "--verify-samples", "500"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert _agreement(out) >= 0.99
    assert "purge: deleted" in out
    assert _count(src, f"SELECT count(*) FROM {table}") == 0
    if not pgvector_standin:  # deepface's serialized search index holds the vectors too
        assert _count(src, "SELECT count(*) FROM embeddings_index") == 0
    assert _templates(gallery, "people") == n
    subjects = {r[0] for r in _rows(gallery, "SELECT s.name FROM subjects s JOIN collections c "
                                             "ON c.id = s.collection_id WHERE c.name = 'people'")}
    assert subjects == {str(s) for s in identity[:n]}  # the folder of img_name is the person
