"""`Gallery` on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

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
