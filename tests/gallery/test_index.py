"""The FAISS index as a cache of SQL: snapshots, replay after a crash, all index kinds."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.gallery.backends.faiss_backends import FaissFlat
from advplugin.gallery.index import IndexConfig, TemplateIndex
from advplugin.gallery.matcher import Matcher
from advplugin.keys import Key
from advplugin.protectors import create_protector

KINDS = ["flat", "ivf", "hnsw", "milvus"]


@pytest.fixture
def protector(key: Key):
    return create_protector("xnn", key=key, dim=64)


def _add(gallery: Gallery, protector, names: list[str], seed: int) -> tuple[list[int], np.ndarray]:
    t = protector.protect(np.random.default_rng(seed).normal(size=(len(names), 64)).astype(np.float32))
    ids = gallery.add_templates(
        names, t, protection=protector.metadata, extractor_name="test", extractor_version="0"
    )
    return ids, t


def _index(gallery: Gallery, kind: str, tmp_path) -> TemplateIndex:
    return TemplateIndex(
        gallery, 64, config=IndexConfig(kind=kind, ivf_nprobe=64), snapshot_path=tmp_path / f"{kind}.npz"
    )


def _sql_ids(gallery: Gallery) -> np.ndarray:
    return np.concatenate([b.ids for b in gallery.iter_templates()] or [np.zeros(0, np.int64)])


@pytest.mark.parametrize("kind", KINDS)
def test_crash_between_sql_commit_and_index_write(gallery: Gallery, protector, tmp_path, kind) -> None:
    ids, t = _add(gallery, protector, [f"s{i % 30}" for i in range(90)], seed=0)
    index = _index(gallery, kind, tmp_path)
    index.load()
    index.save()  # snapshot at this point, then "crash": SQL changes the index never applied
    new_ids, new_t = _add(gallery, protector, ["late1", "late2"], seed=1)
    gallery.delete_subject("s0")  # ids[0], ids[30], ids[60]
    gallery.replace_templates(ids[1:2], new_t[:1], key_id=protector.metadata.key_id)

    restarted = _index(gallery, kind, tmp_path)
    assert restarted.load() is True  # the snapshot was used, then the changes replayed
    np.testing.assert_array_equal(restarted.ids(), _sql_ids(gallery))
    _, hits = restarted.search(np.concatenate([new_t, t[[0, 30]]]), 1)
    assert hits[0, 0] in (new_ids[0], ids[1]) and hits[1, 0] == new_ids[1]
    assert not np.isin(hits[2:], [ids[0], ids[30], ids[60]]).any()
    # The replaced template is found by its new vector only.
    assert restarted.search(t[1:2], 1)[0][0, 0] < 0.99
    found, vectors = restarted.vectors(np.array([ids[1], ids[0]]))  # ids[0] was deleted
    assert found.tolist() == [ids[1]]
    np.testing.assert_allclose(vectors, new_t[:1], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_matcher_ranks_subjects_with_protector_scores(gallery: Gallery, protector, tmp_path, kind) -> None:
    ids, t = _add(gallery, protector, [f"s{i % 40}" for i in range(120)], seed=2)
    index = _index(gallery, kind, tmp_path)
    index.load()
    matcher = Matcher(gallery, index, protector.score)
    res = matcher.identify(t[:10], k=3)
    assert [r[0].subject for r in res] == [f"s{i}" for i in range(10)]
    assert all(abs(r[0].similarity - 1.0) < 1e-4 for r in res)
    assert all(len({m.subject for m in r}) == 3 for r in res)  # subjects, not templates
    assert matcher.identify(t[:3], k=3, threshold=1.5) == [[], [], []]
    m = matcher.verify(t[5], "s5")
    assert m.template_id == ids[5] and m.similarity > 0.999


def test_snapshot_of_another_database_or_corrupt_is_rebuilt(tmp_path, protector) -> None:
    a = Gallery.open(f"sqlite:///{tmp_path / 'a.db'}", upgrade=True)
    b = Gallery.open(f"sqlite:///{tmp_path / 'b.db'}", upgrade=True)
    _add(a, protector, ["x", "y", "z"], seed=3)
    _add(b, protector, ["p", "q"], seed=4)
    snap = tmp_path / "snap.npz"
    ia = TemplateIndex(a, 64, snapshot_path=snap)
    ia.load()
    ia.save()
    ib = TemplateIndex(b, 64, snapshot_path=snap)
    assert ib.load() is False  # a's snapshot must not be used for b
    np.testing.assert_array_equal(ib.ids(), _sql_ids(b))
    snap.write_bytes(b"not a snapshot")
    ia2 = TemplateIndex(a, 64, snapshot_path=snap)
    assert ia2.load() is False and ia2.size == 3
    a.close()
    b.close()


def test_backend_that_cannot_persist_is_rebuilt_never_snapshotted(
    gallery: Gallery, protector, tmp_path, monkeypatch
) -> None:
    """A backend whose state lives elsewhere (`persistent = False`): no snapshot file, and
    every start rebuilds it from SQL."""
    _add(gallery, protector, ["a", "b"], seed=5)
    monkeypatch.setattr(FaissFlat, "persistent", False)
    index = _index(gallery, "flat", tmp_path)
    assert index.load() is False and index.size == 2
    index.save()
    assert not list(tmp_path.glob("*.npz"))


def test_follower_applies_another_writers_changes_without_a_search(
    gallery: Gallery, gallery_url: str, master_key, erasure, protector
) -> None:
    """Two collections followed by ONE follower; a second `Gallery` on the same database
    (another process, as far as these indexes know) enrols and deletes. Within the stated
    bound the indexes hold it without any search having caught up, and a search then does
    not touch SQL (its `sync` finds a recent look)."""
    import threading
    import time

    from advplugin.gallery.index import IndexFollower

    interval = 0.1
    _add(gallery, protector, ["a0", "a1"], 1)
    indexes = {c: TemplateIndex(gallery, 64, collection=c, config=IndexConfig(use_gpu=False, sync_interval=interval))
               for c in ("default", "other")}  # fmt: skip
    for index in indexes.values():
        index.rebuild()
    follower = IndexFollower(gallery, interval)
    other = Gallery.open(gallery_url, master_key=master_key, erasure=erasure)
    try:
        for index in indexes.values():
            follower.add(index)
        ids, _ = _add(other, protector, ["b0"], 2)
        other.add_templates(["c0"], protector.protect(np.ones((1, 64), np.float32)), protection=protector.metadata,
                            extractor_name="test", extractor_version="0", collection="other")  # fmt: skip
        other.delete_subject("a0")

        def held() -> tuple[set[int], int]:
            return set(indexes["default"].ids().tolist()), indexes["other"].size

        deadline = time.monotonic() + 5
        while held()[0] != set(_sql_ids(gallery).tolist()) or held()[1] != 1:
            assert time.monotonic() < deadline, "the follower did not apply the other writer's changes"
            time.sleep(interval / 4)
        assert ids[0] in held()[0]
        me, calls = threading.get_ident(), []
        real = gallery.changes_since

        def spy(*a, **k):  # type: ignore[no-untyped-def]
            if threading.get_ident() == me:  # a search's own catch-up (the follower's are fine)
                calls.append(1)
            return real(*a, **k)

        gallery.changes_since = spy  # type: ignore[method-assign]
        try:
            for _ in range(20):
                indexes["default"].search(np.ones((1, 64), np.float32), 3)
        finally:
            gallery.changes_since = real  # type: ignore[method-assign]
        assert not calls
    finally:
        follower.close()
        other.close()
    with pytest.raises(ValueError, match="positive"):
        IndexFollower(gallery, 0.0)


def test_follower_rebuilds_an_index_when_the_database_goes_back_to_a_backup(
    tmp_path, master_key, erasure, protector
) -> None:
    """A gallery restored from a backup under a running service: its change numbers (and, on
    SQLite, template ids) go back and are given again to new changes. A replay from the
    index's last change would skip those; the follower sees the number go back and rebuilds,
    so the index holds exactly what SQL holds and a reused id names its new subject."""
    import sqlite3
    import time

    from advplugin.gallery.index import IndexFollower

    def copy(src_path, dst_path) -> None:  # type: ignore[no-untyped-def]
        src, dst = sqlite3.connect(src_path), sqlite3.connect(dst_path)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()

    def wait_for(ok, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 5
        while not ok():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    db, backup = tmp_path / "g.db", tmp_path / "backup.db"
    gallery = Gallery.open(f"sqlite:///{db}", upgrade=True, master_key=master_key, erasure=erasure)
    index = TemplateIndex(gallery, 64, config=IndexConfig(use_gpu=False, sync_interval=0.1))
    follower = IndexFollower(gallery, 0.1)
    try:
        _add(gallery, protector, ["a", "b"], 1)
        copy(db, backup)
        index.rebuild()
        follower.add(index)
        _add(gallery, protector, ["c", "d", "e"], 2)
        wait_for(lambda: index.size == 5, "the follower did not apply the enrolments")

        copy(backup, db)  # the restore, under the running follower
        (new_id,), new_t = _add(gallery, protector, ["f"], 3)
        assert new_id <= 5  # an id (and a change number) the index has already seen
        wait_for(lambda: sorted(index.ids().tolist()) == sorted(_sql_ids(gallery).tolist()),
                 "the index kept templates the restored database does not have")
        _, ids, codes = index.search_subjects(new_t, 1)
        assert ids[0, 0] == new_id and index.subject_name(int(codes[0, 0])) == "f"
    finally:
        follower.close()
        gallery.close()


def test_a_look_older_than_this_processs_own_write_does_not_rebuild(gallery: Gallery, protector) -> None:
    """The follower reads the newest change, then compares it with each index: a write this
    process commits and applies in between makes the index look ahead of the gallery. That
    must not pass for a restored database (a rebuild of a large index for nothing)."""
    from advplugin.gallery.index import IndexFollower

    _add(gallery, protector, ["a", "b"], 1)
    index = TemplateIndex(gallery, 64, config=IndexConfig(use_gpu=False, sync_interval=60.0))
    index.rebuild()
    follower = IndexFollower(gallery, 60.0)  # its thread's first look is 30 s away: looks here are ours
    try:
        follower.add(index)  # not looked at yet: the next look compares
        before = follower._watch.latest()
        _add(gallery, protector, ["c"], 2)  # this process's write...
        index.catch_up()  # ...applied at once, as the service applies its own
        assert index.last_seq > before
        real, reads = follower._watch.latest, iter([before])  # ...after the look read `before`
        follower._watch.latest = lambda: next(reads, None) or real()  # type: ignore[method-assign]
        rebuilt: list[int] = []
        real_rebuild = index.rebuild
        index.rebuild = lambda: rebuilt.append(1) or real_rebuild()  # type: ignore[method-assign]
        follower.look()
        assert not rebuilt and index.size == 3
    finally:
        follower.close()


def test_a_snapshot_from_before_a_restore_is_not_taken_for_the_restored_gallery(
    tmp_path, master_key, erasure, protector
) -> None:
    """A snapshot saved, then the database restored from an older backup and written to again
    until its change numbers pass the snapshot's, with as many templates as before: number
    and count agree, but the changes are others. The snapshot records which change its last
    number was, so the load rebuilds instead of serving the old templates under reused ids."""
    import sqlite3

    db, backup = tmp_path / "g.db", tmp_path / "backup.db"
    gallery = Gallery.open(f"sqlite:///{db}", upgrade=True, master_key=master_key, erasure=erasure)
    try:
        _add(gallery, protector, ["a", "b"], 1)
        src, dst = sqlite3.connect(db), sqlite3.connect(backup)
        src.backup(dst)
        src.close()
        dst.close()
        _add(gallery, protector, ["c", "d", "e"], 2)
        index = TemplateIndex(gallery, 64, config=IndexConfig(use_gpu=False), snapshot_path=tmp_path / "snap.npz")
        index.rebuild()
        index.save()
        seq = index.last_seq

        src, dst = sqlite3.connect(backup), sqlite3.connect(db)  # the restore
        src.backup(dst)
        src.close()
        dst.close()
        ids, new_t = _add(gallery, protector, ["x", "y", "z"], 3)  # the same numbers and count again
        assert gallery.last_change_seq() == seq and gallery.count_templates() == 5

        loaded = TemplateIndex(gallery, 64, config=IndexConfig(use_gpu=False), snapshot_path=tmp_path / "snap.npz")
        assert not loaded.load()  # rebuilt from SQL
        _, found, codes = loaded.search_subjects(new_t, 1)
        assert found[:, 0].tolist() == ids
        assert [loaded.subject_name(int(c)) for c in codes[:, 0]] == ["x", "y", "z"]
    finally:
        gallery.close()
