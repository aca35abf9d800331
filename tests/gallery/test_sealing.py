"""Sealed storage on a real SQLite file and a real PostgreSQL database: vectors are stored as
AES-256-GCM ciphertext bound to their row, a wrong or missing master key is a clear error,
an unsealed gallery is converted in place (resumably), master and data keys rotate without
touching template rows, snapshots are sealed, and files are owner-only."""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import stat

import numpy as np
import pytest
from sqlalchemy import text

from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.sealing import (
    ERASABLE_SUBJECT_KEY_BYTES,
    OVERHEAD,
    MasterKeyError,
    TamperedError,
    sealed_size,
)
from advplugin.keys import Key
from advplugin.protectors import Protector, create_protector

DIM = 128


@pytest.fixture
def protector(key: Key) -> Protector:
    return create_protector("xnn", key=key, dim=DIM)


def _templates(p: Protector, n: int, seed: int = 0) -> np.ndarray:
    return p.protect(np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32))


def _add(g: Gallery, p: Protector, names: list[str], t: np.ndarray, collection: str = "default") -> list[int]:
    return g.add_templates(names, t, protection=p.metadata, extractor_name="dlib",
                           extractor_version="1", collection=collection)


def _raw_rows(url: str) -> dict[int, bytes]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = {int(i): bytes(v) for i, v in conn.execute(text("SELECT id, vector FROM templates"))}
    engine.dispose()
    return rows


def _execute(url: str, sql: str, **params: object) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(sql), params)
    engine.dispose()


def test_new_gallery_stores_only_ciphertext_and_reads_back(gallery: Gallery, gallery_url: str, protector) -> None:
    assert gallery.seal_info().sealed and gallery.seal_info().unlocked
    t = _templates(protector, 6)
    names = ["ann", "bob", "ann", "cy", "dee", "bob"]
    ids = _add(gallery, protector, names, t)
    raw = _raw_rows(gallery_url)
    for i, v in zip(ids, t, strict=True):
        assert len(raw[i]) == sealed_size(DIM) == 4 * DIM + OVERHEAD
        assert v.astype("<f4").tobytes()[:16] not in raw[i]  # no plaintext piece stored
    engine = make_engine(gallery_url)
    with engine.connect() as conn:
        keys = [bytes(k) for (k,) in conn.execute(text("SELECT sealed_key FROM subjects"))]
    engine.dispose()
    assert len(keys) == 4 and all(len(k) == ERASABLE_SUBJECT_KEY_BYTES for k in keys)
    rows = gallery.template_rows(ids)
    np.testing.assert_array_equal(np.stack([rows[i].vector for i in ids]), t)
    (batch,) = gallery.iter_templates()
    np.testing.assert_array_equal(batch.vectors, t)
    assert batch.subjects == names
    # Replacing vectors (a key rotation) seals them again under the new provenance.
    t2 = _templates(protector, 2, seed=1)
    gallery.replace_templates(ids[:2], t2, key_id="k2" * 8)
    rows = gallery.template_rows(ids[:2])
    np.testing.assert_array_equal(np.stack([rows[i].vector for i in ids[:2]]), t2)
    assert {r.key_id for r in rows.values()} == {"k2" * 8}


def test_locked_and_wrong_master_keys_are_clear_errors(gallery: Gallery, gallery_url: str, protector) -> None:
    ids = _add(gallery, protector, ["ann"], _templates(protector, 1))
    mk = gallery.seal_info().master_key_ids[0]
    with Gallery.open(gallery_url) as locked:
        assert locked.count_templates() == 1  # what needs no vector still works
        assert not locked.seal_info().unlocked
        with pytest.raises(MasterKeyError, match="ADVPLUGIN_MASTER_KEY_FILE") as e:
            locked.template_rows(ids)
        assert mk in str(e.value)
        with pytest.raises(MasterKeyError):
            _add(locked, protector, ["bob"], _templates(protector, 1))  # never a plaintext write
    secret = base64.b64encode(os.urandom(32)).decode()
    wrong = LocalKeyProvider.from_base64(secret)
    with pytest.raises(MasterKeyError) as e:
        Gallery.open(gallery_url, master_key=wrong)
    assert mk in str(e.value) and wrong.key_id in str(e.value) and secret not in str(e.value)


def test_swapped_moved_or_relabelled_rows_fail_authentication(gallery: Gallery, gallery_url: str, protector, tmp_path) -> None:
    t = _templates(protector, 3)
    a, b, c = _add(gallery, protector, ["ann", "ann", "bob"], t)
    raw = _raw_rows(gallery_url)
    # Two rows of one subject swap ciphertexts: each is bound to its own template id.
    _execute(gallery_url, "UPDATE templates SET vector = :v WHERE id = :i", v=raw[b], i=a)
    with pytest.raises(TamperedError, match=f"template {a} failed authentication"):
        gallery.template_rows([a])
    _execute(gallery_url, "UPDATE templates SET vector = :v WHERE id = :i", v=raw[a], i=a)
    gallery.template_rows([a])  # restored: reads again
    # A forged provenance (another key id) breaks the tag too.
    _execute(gallery_url, "UPDATE templates SET key_id = 'forged0000000000' WHERE id = :i", i=c)
    with pytest.raises(TamperedError, match=f"template {c}"):
        list(gallery.iter_templates())
    # Moved to another collection of the same gallery.
    _execute(gallery_url, "UPDATE templates SET key_id = :k WHERE id = :i", k=protector.metadata.key_id, i=c)
    [other] = _add(gallery, protector, ["ann"], _templates(protector, 1, seed=2), collection="other")
    _execute(gallery_url, "UPDATE templates SET vector = :v WHERE id = :i", v=raw[a], i=other)
    with pytest.raises(TamperedError):
        gallery.template_rows([other])


def test_rows_moved_to_another_gallery_fail_authentication(tmp_path, protector) -> None:
    mk = LocalKeyProvider.from_file(tmp_path / "master.key", create=True)  # even the SAME master key
    urls = [f"sqlite:///{tmp_path / n}.db" for n in ("one", "two")]
    galleries = [Gallery.open(u, upgrade=True, master_key=mk) for u in urls]
    try:
        ids = [_add(g, protector, ["ann"], _templates(protector, 1, seed=i))[0] for i, g in enumerate(galleries)]
        assert ids[0] == ids[1]  # same id, subject, collection and provenance in both
        stolen = _raw_rows(urls[0])[ids[0]]
        _execute(urls[1], "UPDATE templates SET vector = :v WHERE id = :i", v=stolen, i=ids[1])
        with pytest.raises(TamperedError, match=f"template {ids[1]}"):
            galleries[1].template_rows(ids[1:])
        # The subject key row moved along does not help either: it is under the other
        # gallery's data key.
        engine = make_engine(urls[0])
        with engine.connect() as conn:
            sk = conn.scalar(text("SELECT sealed_key FROM subjects WHERE name = 'ann'"))
        engine.dispose()
        _execute(urls[1], "UPDATE subjects SET sealed_key = :k WHERE name = 'ann'", k=sk)
        with pytest.raises(TamperedError, match="subject 'ann'"):
            galleries[1].template_rows(ids[1:])
    finally:
        for g in galleries:
            g.close()


def test_seal_converts_an_unsealed_gallery_in_place_resumably(gallery_url: str, master_key, protector) -> None:
    with Gallery.open(gallery_url, upgrade=True) as g:  # no master key: an unsealed gallery
        assert not g.seal_info().sealed
        t = _templates(protector, 25)
        names = [f"s{i % 7}" for i in range(25)]
        ids = _add(g, protector, names, t)
        seq = g.last_change_seq()
    assert all(len(v) == 4 * DIM for v in _raw_rows(gallery_url).values())

    with Gallery.open(gallery_url, master_key=master_key) as g:
        assert not g.seal_info().sealed  # it has templates: never sealed implicitly
        chunks = g.seal_templates(chunk_size=10)
        assert next(chunks) == 10  # ...then "killed"
        chunks.close()
        info = g.seal_info()
        assert info.sealed and info.converting
        assert g.count_unsealed() == 15
        # Mixed state: both kinds read; new writes are sealed.
        rows = g.template_rows(ids)
        np.testing.assert_array_equal(np.stack([rows[i].vector for i in ids]), t)
        [new] = _add(g, protector, ["s0"], _templates(protector, 1, seed=9))
        assert len(_raw_rows(gallery_url)[new]) == sealed_size(DIM)

    with Gallery.open(gallery_url, master_key=master_key) as g:  # the rerun finishes it
        assert sum(g.seal_templates(chunk_size=10)) == 15
        assert g.count_unsealed() == 0 and not g.seal_info().converting
        (batch,) = g.iter_templates(chunk_size=100)
        np.testing.assert_array_equal(batch.vectors[:25], t)
        assert g.last_change_seq() == seq + 1  # sealing logged nothing for the index
    # Sealed to the end: a plaintext row written around the gallery is refused.
    _execute(gallery_url, "UPDATE templates SET vector = :v WHERE id = :i", v=t[0].astype("<f4").tobytes(), i=ids[0])
    with Gallery.open(gallery_url, master_key=master_key) as g, pytest.raises(TamperedError, match="unsealed"):
        g.template_rows([ids[0]])


def test_rewrap_and_rekey_keep_rows_and_retire_old_keys(tmp_path, master_key, protector) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    with Gallery.open(url, upgrade=True, master_key=master_key) as g:
        t = _templates(protector, 12)
        ids = _add(g, protector, [f"s{i % 5}" for i in range(12)], t)
    before = _raw_rows(url)
    copy = tmp_path / "before.db"
    with sqlite3.connect(tmp_path / "g.db") as src, sqlite3.connect(copy) as dst:
        src.backup(dst)

    new = LocalKeyProvider.from_file(tmp_path / "new-master.key", create=True)
    with Gallery.open(url, master_key=master_key) as g:
        assert g.rewrap(new) == 1
    assert _raw_rows(url) == before  # template rows untouched
    with pytest.raises(MasterKeyError):
        Gallery.open(url, master_key=master_key)
    with Gallery.open(url, master_key=new) as g:
        np.testing.assert_array_equal(np.stack([g.template_rows(ids)[i].vector for i in ids]), t)
        serial = g.begin_rekey()
        moved = g.rekey_subjects(chunk_size=2)
        assert next(moved) == 2
        moved.close()  # interrupted: both data keys open their subjects meanwhile
        assert g.subjects_under_old_keys() == 3
        np.testing.assert_array_equal(np.stack([g.template_rows(ids)[i].vector for i in ids]), t)
        assert g.begin_rekey() == serial  # a rerun continues the same re-key
        assert sum(g.rekey_subjects(chunk_size=2)) == 3
        assert g.seal_info().serials == [serial]
        np.testing.assert_array_equal(np.stack([g.template_rows(ids)[i].vector for i in ids]), t)
    assert _raw_rows(url) == before  # re-keying moves subject keys, never template rows

    # The copy taken before: its data key is wrapped by the old master key only...
    with pytest.raises(MasterKeyError):
        Gallery.open(f"sqlite:///{copy}", master_key=new)
    # ...and its subject keys are under a data key the live gallery no longer holds.
    engine = make_engine(f"sqlite:///{copy}")
    with engine.connect() as conn:
        old_keys = {n: bytes(k) for n, k in conn.execute(text("SELECT name, sealed_key FROM subjects"))}
    engine.dispose()
    with Gallery.open(url, master_key=new) as g:
        sealer = g.snapshot_sealer()
        assert sealer is not None
        cid = g.collection_id()
        for name, blob in old_keys.items():
            with pytest.raises(TamperedError):
                sealer.subject_cipher(cid, name, blob)


def test_snapshots_are_sealed_and_bound_to_their_header(gallery: Gallery, protector, tmp_path) -> None:
    t = _templates(protector, 20)
    _add(gallery, protector, [f"s{i}" for i in range(20)], t)
    path = tmp_path / "index" / "snap.npz"
    index = TemplateIndex(gallery, DIM, snapshot_path=path)
    index.rebuild()
    index.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    blob = path.read_bytes()
    normalised = t / np.linalg.norm(t, axis=1, keepdims=True)
    assert not any(v.astype("<f4").tobytes()[:16] in blob for v in normalised)
    assert TemplateIndex(gallery, DIM, snapshot_path=path).load()  # opens with the gallery key
    # A header edited to pass the snapshot off as newer: authentication fails, rebuilt from SQL.
    with np.load(path) as d:
        meta, data = bytes(d["meta"]), d["index"]
    np.savez(path, index=data, meta=np.frombuffer(meta.replace(b'"last_seq": ', b'"last_seq": 0'), np.uint8))
    again = TemplateIndex(gallery, DIM, snapshot_path=path)
    assert not again.load() and again.size == 20


def test_files_are_owner_only(tmp_path, protector) -> None:
    from advplugin.service.startup import prepare_data_dir

    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        data.mkdir(mode=0o755)
        prepare_data_dir(data)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        mk = LocalKeyProvider.from_file(tmp_path / "master.key", create=True)
        assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
        with Gallery.open(f"sqlite:///{data / 'gallery.db'}", upgrade=True, master_key=mk) as g:
            _add(g, protector, ["ann"], _templates(protector, 1))
            for name in ("gallery.db", "gallery.db-wal", "gallery.db-shm"):
                assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        # A gallery made before (0644) is tightened when opened.
        (data / "gallery.db").chmod(0o644)
        Gallery.open(f"sqlite:///{data / 'gallery.db'}").close()
        assert stat.S_IMODE((data / "gallery.db").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    # A master key file others can read is refused, as key files are.
    shutil.copy(tmp_path / "master.key", tmp_path / "loose.key")
    (tmp_path / "loose.key").chmod(0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        LocalKeyProvider.from_file(tmp_path / "loose.key")


def test_secure_delete_is_on(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    engine.dispose()


def test_migration_0005_round_trip_refuses_to_drop_sealing(gallery_url: str, master_key, protector) -> None:
    """0005 adds only; its downgrade refuses a sealed gallery (older code cannot read it)."""
    from alembic import command

    from advplugin.gallery.schema import alembic_config, upgrade

    with Gallery.open(gallery_url, upgrade=True, master_key=master_key) as g:
        _add(g, protector, ["ann"], _templates(protector, 1))
    engine = make_engine(gallery_url)
    try:
        cfg = alembic_config()
        with pytest.raises(RuntimeError, match="sealed"), engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0004_templates_config_digest")
        _execute(gallery_url, "DELETE FROM templates")
        _execute(gallery_url, "DELETE FROM sealing_keys")
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0004_templates_config_digest")
        upgrade(engine)
    finally:
        engine.dispose()
    Gallery.open(gallery_url).close()


def test_db_seal_status_and_rewrap_commands(tmp_path, protector, master_key_file, capsys) -> None:
    from advplugin.cli.main import main

    url = f"sqlite:///{tmp_path / 'g.db'}"
    with Gallery.open(url, upgrade=True) as g:  # an existing, unsealed gallery
        ids = _add(g, protector, [f"s{i}" for i in range(7)], _templates(protector, 7))
    assert main(["db", "status", "--database-url", url]) == 0
    assert "NOT sealed" in capsys.readouterr().out
    assert not master_key_file.exists()
    assert main(["db", "seal", "--database-url", url, "--chunk-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "sealed 7 templates" in out  # their subjects' new keys come with erasure keys
    assert stat.S_IMODE(master_key_file.stat().st_mode) == 0o600  # made by `db seal`
    assert all(len(v) == sealed_size(DIM) for v in _raw_rows(url).values())
    assert main(["db", "seal", "--database-url", url]) == 0  # idempotent
    main(["db", "status", "--database-url", url])
    out = capsys.readouterr().out
    assert "storage: sealed" in out and "erasure: 0 subjects without an erasure key" in out

    new = tmp_path / "new.key"
    before = _raw_rows(url)
    assert main(["db", "rewrap", "--database-url", url, "--new-master-key", str(new)]) == 0
    assert _raw_rows(url) == before
    with pytest.raises(MasterKeyError):
        Gallery.open(url, master_key=LocalKeyProvider.from_file(master_key_file))
    erasure = ErasureKeyStore.open(tmp_path / "erasure-keys.db")  # beside the master key: the default
    with Gallery.open(url, master_key=LocalKeyProvider.from_file(new), erasure=erasure) as g:
        assert sorted(g.template_rows(ids)) == ids
    # A command that needs vectors, with the old (now wrong) master key: one clear line.
    from advplugin.keys import write_key

    write_key(tmp_path / "k1")
    write_key(tmp_path / "k2")
    assert main(["rotate-key", "--gallery", url, "--old-key", str(tmp_path / "k1"), "--new-key",
                 str(tmp_path / "k2")]) == 3  # a configuration error (`advplugin --help`)
    err = capsys.readouterr().err
    assert "wrong master key" in err and "Traceback" not in err


def test_service_refuses_to_start_without_its_master_key(tmp_path, protector) -> None:
    import subprocess
    import sys

    mk = LocalKeyProvider.from_file(tmp_path / "master.key", create=True)
    url = f"sqlite:///{tmp_path / 'g.db'}"
    with Gallery.open(url, upgrade=True, master_key=mk) as g:
        _add(g, protector, ["ann"], _templates(protector, 1))
    wrong = tmp_path / "wrong.key"
    LocalKeyProvider.from_file(wrong, create=True)
    loose = tmp_path / "loose.key"
    shutil.copy(tmp_path / "master.key", loose)
    loose.chmod(0o640)
    cases = {
        str(tmp_path / "missing.key"): ["missing.key", "ADVPLUGIN_MASTER_KEY", mk.key_id],
        str(wrong): ["wrong master key", mk.key_id],
        str(loose): ["chmod 600"],
    }
    for path, musts in cases.items():
        env = {**os.environ, "ADVPLUGIN_MASTER_KEY_FILE": path, "ADVPLUGIN_MODE": "templates",
               "ADVPLUGIN_TEMPLATE_KEY_ID": protector.metadata.key_id}
        r = subprocess.run(
            [sys.executable, "-m", "advplugin.service", "--database-url", url, "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        for must in musts:
            assert must in r.stderr, (path, r.stderr[-1000:])
