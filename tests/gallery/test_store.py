"""`Gallery` on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sqlalchemy import text

from advplugin.gallery import Gallery, NotMigratedError, SubjectNotFound, make_engine
from advplugin.keys import Key
from advplugin.protectors import create_protector


@pytest.fixture
def protector(key: Key):
    return create_protector("xnn", key=key, dim=128)


def _templates(protector, n: int, seed: int = 0) -> np.ndarray:
    return protector.protect(np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32))


def test_unmigrated_database_is_refused_with_the_command_to_run(gallery_url: str) -> None:
    with pytest.raises(NotMigratedError, match="advplugin db upgrade"):
        Gallery.open(gallery_url)
    Gallery.open(gallery_url, upgrade=True).close()
    Gallery.open(gallery_url).close()  # now accepted


def test_add_iterate_replace_delete(gallery: Gallery, protector) -> None:
    t = _templates(protector, 6)
    names = ["ann", "bob", "ann", "cy", "cy", "cy"]
    ids = gallery.add_templates(
        names, t, protection=protector.metadata, extractor_name="dlib", extractor_version="v1"
    )
    assert len(ids) == 6 and ids == sorted(ids)
    assert gallery.count_templates() == 6 and gallery.count_subjects() == 3

    batches = list(gallery.iter_templates(chunk_size=4))
    assert [len(b) for b in batches] == [4, 2]
    got = np.concatenate([b.vectors for b in batches])
    np.testing.assert_array_equal(got, t)
    assert [s for b in batches for s in b.subjects] == names
    assert {k for b in batches for k in b.key_id} == {protector.metadata.key_id}

    # Rotation guard: rows must still carry from_key_id, else nothing changes.
    with pytest.raises(ValueError, match="not under key"):
        gallery.replace_templates(ids[:2], t[:2], key_id="k2", from_key_id="other")
    assert gallery.count_templates(key_id="k2") == 0
    with pytest.raises(KeyError):
        gallery.replace_templates([ids[0], 10**9], t[:2], key_id="k2")
    assert gallery.count_templates(key_id="k2") == 0
    new = _templates(protector, 2, seed=1)
    assert gallery.replace_templates(ids[:2], new, key_id="k2", from_key_id=protector.metadata.key_id) == 2
    stored = gallery.get_templates(ids[:2])
    np.testing.assert_array_equal(stored[ids[0]][1], new[0])
    assert gallery.count_templates(key_id="k2") == 2

    seq_before = gallery.last_change_seq()
    assert gallery.delete_subject("cy") == 3
    with pytest.raises(SubjectNotFound):
        gallery.delete_subject("cy")
    assert gallery.count_templates() == 3 and gallery.count_subjects() == 2
    changes = gallery.changes_since(seq_before)
    assert [(c.template_id, c.op) for c in changes] == [(i, "delete") for i in ids[3:]]
    ops = [c.op for c in gallery.changes_since(0)]
    assert ops == ["upsert"] * 8 + ["delete"] * 3
    assert [s.name for s in gallery.list_subjects()] == ["ann", "bob"]
    assert gallery.get_subject("ann").template_count == 2


def test_failed_batch_changes_nothing(gallery: Gallery, protector) -> None:
    t = _templates(protector, 3)
    with pytest.raises(ValueError, match="dimension"):
        gallery.add_templates(
            ["a", "b", "c"], t[:, :64], protection=protector.metadata,
            extractor_name="dlib", extractor_version="v1",
        )
    with pytest.raises(ValueError, match="subject names"):
        gallery.add_templates(
            ["a", "", "c"], t, protection=protector.metadata, extractor_name="dlib", extractor_version="v1"
        )
    assert gallery.count_templates() == 0 and gallery.count_subjects() == 0
    assert gallery.last_change_seq() == 0


def test_collections_are_isolated(gallery: Gallery, protector) -> None:
    t = _templates(protector, 2)
    kw = {"protection": protector.metadata, "extractor_name": "dlib", "extractor_version": "v1"}
    gallery.add_templates(["a"], t[:1], collection="one", **kw)
    gallery.add_templates(["a"], t[1:], collection="two", **kw)
    assert gallery.count_templates(collection="one") == 1
    assert gallery.delete_subject("a", collection="one") == 1
    assert gallery.count_templates(collection="two") == 1
    assert gallery.changes_since(0, collection="two")[0].op == "upsert"


def test_api_keys_stored_only_as_hashes(gallery: Gallery, gallery_url: str) -> None:
    api_key = gallery.create_api_key("ops")
    engine = make_engine(gallery_url)
    with engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(text("SELECT * FROM api_keys"))]
    engine.dispose()
    assert rows and not any(api_key in v for r in rows for v in r)
    assert len(gallery.api_key_hashes()) == 1
    assert gallery.revoke_api_keys("ops") == 1
    assert gallery.api_key_hashes() == []


def test_transaction_commits_together_or_not_at_all(gallery: Gallery, protector) -> None:
    kw = {"protection": protector.metadata, "extractor_name": "dlib", "extractor_version": "v1"}
    gallery.add_templates(["ann"], _templates(protector, 1), **kw)
    seq = gallery.last_change_seq()
    with pytest.raises(RuntimeError, match="boom"), gallery.transaction() as tx:
        tx.add_templates(["ann", "bob"], _templates(protector, 2, seed=1), collection="other", **kw)
        tx.connection.execute(text("UPDATE subjects SET info = NULL"))  # the caller's own SQL
        raise RuntimeError("boom")
    assert gallery.count_templates(collection=None) == 1 and gallery.count_subjects() == 1
    assert gallery.last_change_seq() == seq and "other" not in gallery.collections()

    with gallery.transaction() as tx:
        first = tx.add_templates(["bob", "cy"], _templates(protector, 2, seed=2), **kw)
        with tx.transaction() as inner:  # joins the outer transaction
            second = inner.add_templates(["cy"], _templates(protector, 1, seed=3), **kw)
    ids = first + second
    assert ids == sorted(ids) and gallery.count_templates() == 4
    assert sorted(c.template_id for c in gallery.changes_since(seq)) == ids
    with pytest.raises(RuntimeError, match="only inside"):
        gallery.connection  # noqa: B018


def test_bulk_insert_ids_metadata_and_concurrent_writers(gallery: Gallery, protector) -> None:
    """The bulk path allocates ids itself: they must stay unique under concurrent writers,
    never be reused after the highest one is deleted, and carry every column."""
    from concurrent.futures import ThreadPoolExecutor

    kw = {"protection": protector.metadata, "extractor_name": "dlib", "extractor_version": "v1"}
    t = _templates(protector, 3)
    ids = gallery.add_templates(["a", "b", "a"], t, image_sha256=["h1", None, "h3"],
                                images=[b"\x00jpeg\xff", None, b"png"], **kw)
    rows = gallery.template_rows(ids)
    assert [rows[i].subject for i in ids] == ["a", "b", "a"]
    np.testing.assert_array_equal(np.stack([rows[i].vector for i in ids]), t)
    with gallery.engine.connect() as conn:
        got = conn.execute(text("SELECT id, image_sha256, image, key_id, dim, scheme FROM templates ORDER BY id")).all()
    assert [(r[1], None if r[2] is None else bytes(r[2])) for r in got] == [
        ("h1", b"\x00jpeg\xff"), (None, None), ("h3", b"png")]
    assert {(r[3], r[4], r[5]) for r in got} == {(protector.metadata.key_id, 128, "xnn")}

    assert gallery.delete_templates([ids[-1]]) == 1
    again = gallery.add_templates(["c"], t[:1], **kw)
    assert again[0] > ids[-1]  # a FAISS id never comes to mean another template

    def write(w: int) -> list[int]:
        out = []
        for c in range(5):
            names = [f"w{w}-{i % 7}" for i in range(50)]
            out += gallery.add_templates(names, _templates(protector, 50, seed=10 * w + c), **kw)
        return out

    with ThreadPoolExecutor(4) as pool:
        written = [i for part in pool.map(write, range(4)) for i in part]
    assert len(set(written)) == 1000 and min(written) > again[0]
    assert gallery.count_templates() == 3 + 1000 and gallery.count_subjects() == 3 + 28
    logged = [c.template_id for c in gallery.changes_since(0)]
    assert sorted(set(logged) & set(written)) == sorted(written) and len(logged) == len(set(logged)) + 1


def test_config_digest_on_every_row(gallery: Gallery, protector, key) -> None:
    """Written from `protection` on both insert paths, kept by a re-keying replace unless a
    new one is given, grouped by in provenance, carried per row by TemplateBatch."""
    gaussian = create_protector("xnn", key=key, dim=128, matrix="gaussian")
    assert gaussian.metadata.config_digest != protector.metadata.config_digest
    kw = {"extractor_name": "dlib", "extractor_version": "v1"}
    ortho_ids = gallery.add_templates(["a", "b"], _templates(protector, 2), protection=protector.metadata, **kw)
    gauss_ids = gallery.add_templates(["c"], _templates(gaussian, 1), protection=gaussian.metadata, **kw)
    digests = [d for b in gallery.iter_templates() for d in b.config_digest]
    assert digests == [protector.metadata.config_digest] * 2 + [gaussian.metadata.config_digest]
    groups = {(g["config_digest"], g["count"]) for g in gallery.provenance()}
    assert groups == {(protector.metadata.config_digest, 2), (gaussian.metadata.config_digest, 1)}

    gallery.replace_templates(ortho_ids[:1], _templates(protector, 1, seed=5), key_id="k2")
    gallery.replace_templates(gauss_ids, _templates(protector, 1, seed=6), key_id="k2",
                              config_digest=protector.metadata.config_digest)
    digests = [d for b in gallery.iter_templates() for d in b.config_digest]
    assert digests == [protector.metadata.config_digest] * 3

    bad = dataclasses.replace(protector.metadata, config_digest="not-a-digest")
    with pytest.raises(ValueError, match="config_digest"):
        gallery.add_templates(["d"], _templates(protector, 1), protection=bad, **kw)
    with pytest.raises(ValueError, match="config_digest"):
        gallery.replace_templates(ortho_ids, _templates(protector, 2), key_id="k3", config_digest="XYZ")
    assert gallery.count_templates() == 3 and gallery.count_templates(key_id="k3") == 0
