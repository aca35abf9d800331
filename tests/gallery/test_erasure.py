"""Erasure keys (`advplugin.gallery.erasure`), on a real SQLite file and a real PostgreSQL
database: a deleted subject's erasure key leaves the store, so what a copy of the database
made before the delete holds of it (its sealed subject key and ciphertexts) opens nothing
with the unchanged master key, while everyone else reads; a delete interrupted before the
shred is completed later; a gallery needing a store refuses to open without it or with a
wrong one; subjects sealed before the store existed are given erasure keys by `db seal`;
an older snapshot file dies with the next snapshot; a restored backup is purged."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from advplugin.gallery import Gallery, make_engine
from advplugin.gallery.erasure import POOL, ErasureKeyStore
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.sealing import (
    ERASABLE_SUBJECT_KEY_BYTES,
    SUBJECT_KEY_BYTES,
    ErasedError,
    ErasureStoreMissing,
    MasterKeyError,
    Sealer,
    template_ad,
)
from advplugin.gallery.snapshot import read_snapshot
from advplugin.keys import Key
from advplugin.protectors import Protector, create_protector

DIM = 128
NAMES = ["victim", "victim", "bob", "cy"]


@pytest.fixture
def protector(key: Key) -> Protector:
    return create_protector("xnn", key=key, dim=DIM)


def _add(g: Gallery, p: Protector, names: list[str], seed: int = 0) -> list[int]:
    t = p.protect(np.random.default_rng(seed).normal(size=(len(names), DIM)).astype(np.float32))
    return g.add_templates(names, t, protection=p.metadata, extractor_name="dlib", extractor_version="1")


def _stolen(url: str, name: str) -> tuple[bytes, list[tuple]]:
    """What a copy of the database holds of a subject: its sealed key and its template rows
    (id, collection, vector, dim, scheme, version, digest, key id), read as a thief would."""
    engine = make_engine(url)
    with engine.connect() as conn:
        sk = bytes(conn.scalar(text("SELECT sealed_key FROM subjects WHERE name = :n"), {"n": name}))
        rows = conn.execute(text(
            "SELECT t.id, t.collection_id, t.vector, t.dim, t.scheme, t.scheme_version, t.config_digest, t.key_id "
            "FROM templates t JOIN subjects s ON s.id = t.subject_id WHERE s.name = :n"), {"n": name}).all()
    engine.dispose()
    return sk, [tuple(r) for r in rows]


def _open_rows(sealer: Sealer, name: str, sealed_key: bytes, rows: list[tuple]) -> list[np.ndarray]:
    out = []
    for tid, cid, blob, dim, scheme, version, digest, kid in rows:
        aead = sealer.subject_cipher(cid, name, sealed_key, cache=False)
        ad = template_ad(cid, tid, scheme, version, digest, kid, dim)
        out.append(np.frombuffer(Sealer.open_vector(aead, ad, bytes(blob), tid), "<f4"))
    return out


def test_store_files_are_owner_only(erasure: ErasureKeyStore, tmp_path: Path) -> None:
    erasure.create([b"r" * 16])
    folder = tmp_path / "keys"
    store = ErasureKeyStore.open(folder / "erasure-keys.db")
    store.create([b"s" * 16])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    store.close()


@pytest.mark.parametrize("where", ["file", "postgresql"])
def test_store_creates_gets_and_shreds(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The store on its own, as a file and as a shared database (replicas)."""
    if where == "file":
        store = ErasureKeyStore.open(tmp_path / "erasure-keys.db")
    else:
        url = request.getfixturevalue("postgres_url")
        store = ErasureKeyStore.open(url)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM erasure_keys")
    try:
        refs = [bytes([i]) * 16 for i in range(3)]
        made = store.create(refs)
        assert len(set(made.values())) == 3 and all(len(k) == 32 for k in made.values())
        assert store.get([*refs, b"x" * 16]) == made  # unknown references are simply absent
        snaps = [store.create([bytes([9, i]) * 8], kind="snapshot:s")[bytes([9, i]) * 8] for i in range(2)]
        assert len(snaps) == 2 and store.shred_kind_except("snapshot:s", keep=bytes([9, 1]) * 8) == 1
        assert store.shred([refs[0], refs[0], b"x" * 16]) == 1
        assert store.get(refs) == {r: made[r] for r in refs[1:]}
        assert store.count("subject") == 2 and store.count() == 3
        with pytest.raises(IntegrityError):  # a reference is never silently given a second key
            store.create([refs[1]])
        assert store.get([refs[1]]) == {refs[1]: made[refs[1]]}
    finally:
        store.close()


def test_erasure_keys_come_from_a_pool_and_unused_ones_are_shredded(
    gallery_url: str, master_key: LocalKeyProvider, tmp_path: Path, protector
) -> None:
    """One durable store commit per POOL new subjects, not per enrolment; closing shreds the rest."""
    store = ErasureKeyStore.open(tmp_path / "pool" / "erasure-keys.db")
    commits = []
    create = store.create
    store.create = lambda refs, **kw: commits.append(len(refs)) or create(refs, **kw)  # type: ignore[method-assign]
    with Gallery.open(gallery_url, upgrade=True, master_key=master_key, erasure=store) as g:
        for i in range(10):
            _add(g, protector, [f"p{i}"], seed=i)
        assert commits == [1 + POOL]  # the first new subject filled the pool
        assert store.count("subject") == 1 + POOL
        names = {s.name for s in g.list_subjects()}
    assert names == {f"p{i}" for i in range(10)}
    assert store.count("subject") == 10  # the unused pool went at close
    with Gallery.open(gallery_url, master_key=master_key, erasure=store) as g:
        assert sorted(s for b in g.iter_templates() for s in b.subjects) == sorted(names)
    store.close()


def test_a_copy_made_before_a_delete_opens_nothing_of_the_subject(
    gallery: Gallery, gallery_url: str, master_key: LocalKeyProvider, erasure: ErasureKeyStore, protector
) -> None:
    ids = _add(gallery, protector, NAMES)
    sk, rows = _stolen(gallery_url, "victim")  # the copy a backup would hold
    assert len(sk) == ERASABLE_SUBJECT_KEY_BYTES and len(rows) == 2
    sealer = gallery.snapshot_sealer()
    assert sealer is not None
    before = _open_rows(sealer, "victim", sk, rows)  # control: the copy opens while the subject lives
    live = gallery.get_templates(ids[:2])
    for (tid, *_), v in zip(rows, before, strict=True):
        assert np.array_equal(v, live[int(tid)][1])
    n_keys = erasure.count("subject")

    assert gallery.delete_subject("victim") == 2
    assert erasure.count("subject") == n_keys - 1 and gallery.pending_erasures() == 0
    # The same master key, the same store, the whole copy: the victim's key is gone.
    fresh = Gallery.open(gallery_url, master_key=master_key, erasure=erasure)
    try:
        thief = fresh.snapshot_sealer()
        assert thief is not None
        with pytest.raises(ErasedError, match="victim"):
            _open_rows(thief, "victim", sk, rows)
        assert sorted(s for b in fresh.iter_templates() for s in b.subjects) == ["bob", "cy"]
    finally:
        fresh.close()


def test_a_delete_interrupted_before_the_shred_is_completed_later(
    gallery: Gallery, gallery_url: str, master_key: LocalKeyProvider, erasure: ErasureKeyStore, protector
) -> None:
    _add(gallery, protector, NAMES)
    sk, rows = _stolen(gallery_url, "victim")
    with gallery.transaction() as tx:  # committed; the process "dies" before completing
        tx.delete_subject("victim")
    assert gallery.pending_erasures() == 1
    assert len(_open_rows(gallery.snapshot_sealer(), "victim", sk, rows)) == 2  # still alive: the gap

    restarted = Gallery.open(gallery_url, master_key=master_key, erasure=erasure)
    try:
        assert restarted.complete_erasures() == 1  # what start-up (unlock_gallery) runs
        assert restarted.pending_erasures() == 0
        with pytest.raises(ErasedError):
            _open_rows(restarted.snapshot_sealer(), "victim", sk, rows)
    finally:
        restarted.close()


def test_a_gallery_with_erasure_keys_needs_its_store(
    gallery: Gallery, gallery_url: str, master_key: LocalKeyProvider, protector, tmp_path: Path
) -> None:
    _add(gallery, protector, NAMES)
    with pytest.raises(ErasureStoreMissing, match="ADVPLUGIN_ERASURE_KEY_STORE"):
        Gallery.open(gallery_url, master_key=master_key)
    other = ErasureKeyStore.open(tmp_path / "other" / "erasure-keys.db")
    with pytest.raises(MasterKeyError, match="not this gallery's store"):
        Gallery.open(gallery_url, master_key=master_key, erasure=other)
    other.close()


def test_db_seal_gives_subjects_sealed_before_the_store_erasure_keys(
    gallery_url: str, master_key: LocalKeyProvider, erasure: ErasureKeyStore, protector
) -> None:
    with Gallery.open(gallery_url, upgrade=True, master_key=master_key) as g:  # no store: the old way
        ids = _add(g, protector, NAMES)
        before = g.get_templates(ids)
    sk, rows = _stolen(gallery_url, "victim")
    assert len(sk) == SUBJECT_KEY_BYTES
    with Gallery.open(gallery_url, master_key=master_key, erasure=erasure) as g:
        assert g.count_unerasable() == 3
        _add(g, protector, ["dee"], seed=1)  # a new subject gets an erasure key at once
        assert g.count_unerasable() == 3
        assert sum(list(g.make_subjects_erasable(chunk_size=2))) == 3
        assert g.count_unerasable() == 0 and list(g.make_subjects_erasable()) == []
        after = g.get_templates(ids)
        for i in ids:  # same vectors, now under new subject keys
            assert after[i][0] == before[i][0] and np.array_equal(after[i][1], before[i][1])
        new_sk, new_rows = _stolen(gallery_url, "victim")
        assert len(new_sk) == ERASABLE_SUBJECT_KEY_BYTES
        assert {bytes(r[2]) for r in new_rows}.isdisjoint(bytes(r[2]) for r in rows)  # re-sealed
        g.delete_subject("victim")
        with pytest.raises(ErasedError):
            _open_rows(g.snapshot_sealer(), "victim", new_sk, new_rows)


def test_an_older_snapshot_file_dies_with_the_next_snapshot(
    gallery: Gallery, erasure: ErasureKeyStore, protector, tmp_path: Path
) -> None:
    _add(gallery, protector, NAMES)
    path = tmp_path / "index" / "default.npz"
    index = TemplateIndex(gallery, dim=DIM, snapshot_path=path)
    index.catch_up()
    index.save()
    copied = tmp_path / "copied.npz"
    shutil.copy(path, copied)
    sealer = gallery.snapshot_sealer()
    meta, _ = read_snapshot(copied, sealer=sealer)  # control: the copy opens now
    assert "erasure_ref" in meta
    gallery.delete_subject("victim")
    index.catch_up()
    index.save()
    assert erasure.count() - erasure.count("subject") == 1  # one live snapshot key
    with pytest.raises(ErasedError):
        read_snapshot(copied, sealer=sealer)
    read_snapshot(path, sealer=sealer)  # the new one opens
    reloaded = TemplateIndex(gallery, dim=DIM, snapshot_path=path)
    assert reloaded.load() and reloaded.size == 2


def test_purge_erased_drops_what_a_restored_backup_holds_of_deleted_people(
    master_key: LocalKeyProvider, erasure: ErasureKeyStore, protector, tmp_path: Path
) -> None:
    """SQLite: a file copy stands for the backup (PostgreSQL dumps: test_sealing_erasure.py)."""
    gallery_url = f"sqlite:///{tmp_path / 'gallery.db'}"
    with Gallery.open(gallery_url, upgrade=True, master_key=master_key, erasure=erasure) as g:
        _add(g, protector, NAMES)
        g.checkpoint()
    db = Path(make_engine(gallery_url).url.database)
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)
    with Gallery.open(gallery_url, master_key=master_key, erasure=erasure) as g:
        g.delete_subject("victim")
    with Gallery.open(f"sqlite:///{backup}", master_key=master_key, erasure=erasure) as restored:
        with pytest.raises(ErasedError, match="purge-erased"):
            list(restored.iter_templates())
        assert restored.purge_erased() == [(restored.collection_id(), "victim")]
        assert sorted(s for b in restored.iter_templates() for s in b.subjects) == ["bob", "cy"]
