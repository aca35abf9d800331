"""What the milvus backend adds to the contract suite (tests/gallery/test_backends.py runs that
suite on it because it is registered): naming by gallery, the alias swap of a rebuild seen by
another replica, the snapshot handle, the index types milvus-lite really builds, and the
configuration. Every test here shares the process's one temporary milvus-lite instance (a bare
IndexConfig has no URI), so milvus-lite starts once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.gallery.backends import IndexConfig, create_index_backend
from advplugin.gallery.index import TemplateIndex
from advplugin.keys import Key
from advplugin.protectors import create_protector
from tests.gallery.test_backends import BACKENDS

pytest.importorskip("pymilvus")
milvus_lite = pytest.importorskip("milvus_lite")

from advplugin.gallery.backends.milvus_backend import (  # noqa: E402  (after the skip)
    CLIENTS,
    LITE_INDEX_TYPES,
    MilvusBackend,
    _redacted,
)

DIM = 16


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def backend(namespace: str | None = None, **config: object) -> MilvusBackend:
    b = create_index_backend("milvus", dim=DIM, config=IndexConfig(backend="milvus", **config))
    if namespace:
        b.bind(lambda: namespace)
    assert isinstance(b, MilvusBackend)
    return b


def test_the_contract_suite_runs_on_milvus() -> None:
    assert "milvus" in BACKENDS


def test_a_rebuild_swaps_in_a_new_collection_that_other_replicas_see() -> None:
    """Two backends bound to one gallery (two replicas on one server) search one alias: a
    rebuild by one replaces the content for both, and the old collection is dropped."""
    a, b = backend("swap"), backend("swap")
    ids, vecs = np.arange(10, 30), unit(20, 0)
    a.add(ids, vecs)
    assert b.size == 20 and b.search(vecs[:1], 1)[1][0, 0] == 10  # b sees a's writes
    before = a._client.describe_alias(a.alias)["collection_name"]
    b.rebuild([(ids[:5], vecs[:5])], n_expected=5)
    after = a._client.describe_alias(a.alias)["collection_name"]
    assert after != before and not a._client.has_collection(before)
    np.testing.assert_array_equal(a.ids(), ids[:5])
    assert a.search(vecs[10:11], 1)[0][0, 0] < 0.99  # what the rebuild left out is gone


def test_a_failed_rebuild_keeps_the_old_content() -> None:
    b, ids, vecs = backend("failed-rebuild"), np.arange(1, 11), unit(10, 1)
    b.add(ids, vecs)
    collections = set(b._client.list_collections())

    def broken():
        yield ids[:3], vecs[:3]
        raise OSError("SQL went away")

    with pytest.raises(OSError):
        b.rebuild(broken(), n_expected=10)
    np.testing.assert_array_equal(b.ids(), ids)
    assert set(b._client.list_collections()) == collections  # the half-built one is dropped


def test_two_galleries_never_share_a_collection(tmp_path: Path, key: Key) -> None:
    protector = create_protector("xnn", key=key, dim=DIM)
    indexes = []
    for name in ("a", "b"):
        g = Gallery.open(f"sqlite:///{tmp_path / name}.db", upgrade=True)
        t = protector.protect(np.random.default_rng(len(name) + ord(name)).normal(size=(3, DIM)).astype(np.float32))
        g.add_templates([f"{name}{i}" for i in range(3)], t, protection=protector.metadata,
                        extractor_name="test", extractor_version="0")
        index = TemplateIndex(g, DIM, config=IndexConfig(backend="milvus"), snapshot_path=tmp_path / f"{name}.npz")
        index.load()
        indexes.append((g, index))
    (ga, ia), (gb, ib) = indexes
    assert ia._backend.alias != ib._backend.alias
    assert ia.size == 3 == ib.size  # neither holds the other's templates
    ia.save()
    # a's snapshot handle is refused for b (another gallery): b rebuilds from its own SQL.
    ib2 = TemplateIndex(gb, DIM, config=IndexConfig(backend="milvus"), snapshot_path=tmp_path / "a.npz")
    assert ib2.load() is False and ib2.size == 3
    ga.close()
    gb.close()


def test_snapshot_handle_holds_no_vectors_and_is_refused_elsewhere() -> None:
    b = backend("handle")
    b.add(np.arange(1, 4), unit(3, 2))
    blob = b.serialize()
    assert len(blob) < 500 and b.alias.encode() in blob
    with pytest.raises(ValueError, match="another Milvus"):
        MilvusBackend.deserialize(blob.replace(b'"uri": "', b'"uri": "/elsewhere'), dim=DIM, config=b.config)
    hnsw = IndexConfig(backend="milvus", milvus_index_type="HNSW")
    with pytest.raises(ValueError, match="FLAT index, configured: HNSW"):  # config changed: rebuild
        MilvusBackend.deserialize(blob, dim=DIM, config=hnsw)
    b._client.drop_collection(b._client.describe_alias(b.alias)["collection_name"])
    with pytest.raises(ValueError, match="gone"):  # e.g. the Milvus data was lost: rebuild
        MilvusBackend.deserialize(blob, dim=DIM, config=b.config)


def test_handles_never_hold_credentials() -> None:
    assert _redacted("http://root:Milvus@db.example:19530/x") == "http://db.example:19530/x"
    assert _redacted("https://db.example") == "https://db.example"
    assert _redacted("rel/milvus.db") == str(Path("rel/milvus.db").absolute())


@pytest.mark.parametrize(("index_type", "params"), [("HNSW", {"M": 16, "efConstruction": 64}), ("IVF_FLAT", {"nlist": 4})])
def test_approximate_index_types_search_and_update(index_type: str, params: dict) -> None:
    b = backend(f"ann_{index_type.lower()}", milvus_index_type=index_type, milvus_index_params=params,
                milvus_search_params={"ef": 64, "nprobe": 4})
    ids, vecs = np.arange(1, 301), unit(300, 3)
    b.rebuild([(ids, vecs)], n_expected=300)
    assert b._client.describe_index(b.alias, "vector")["index_type"] == index_type
    _, found = b.search(vecs[:20], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:20])
    b.remove(ids[:1])
    assert b.search(vecs[:1], 1)[1][0, 0] != 1


def test_milvus_lite_uri_refuses_index_types_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="milvus-lite cannot build a IVF_PQ"):
        backend(milvus_index_type="IVF_PQ")


@pytest.mark.parametrize("index_type", sorted(LITE_INDEX_TYPES | {"IVF_PQ", "DISKANN", "SCANN"}))
def test_lite_index_types_are_what_milvus_lite_really_builds(index_type: str) -> None:
    """milvus-lite takes any index name, reports it "Finished" in describe_index and then fails
    in its background builder (searching by brute force). LITE_INDEX_TYPES must be exactly the
    types its builder accepts: this fails when a milvus-lite release changes that."""
    from milvus_lite.index.factory import build_index_from_spec
    from milvus_lite.index.spec import IndexSpec

    spec = IndexSpec(field_name="vector", index_type=index_type, metric_type="IP", build_params={"nlist": 4})
    if index_type in LITE_INDEX_TYPES:
        build_index_from_spec(spec, unit(256, 4))
    else:
        with pytest.raises((ValueError, NotImplementedError)):
            build_index_from_spec(spec, unit(256, 4))


def test_service_settings_keep_milvus_lite_in_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from advplugin.settings import Settings

    monkeypatch.setenv("ADVPLUGIN_INDEX__BACKEND", "milvus")
    monkeypatch.setenv("ADVPLUGIN_INDEX__MILVUS_INDEX_PARAMS", '{"M": 16}')
    s = Settings(data_dir=tmp_path / "data")
    assert s.index.milvus_uri == str((tmp_path / "data" / "milvus.db").absolute())
    assert s.index.milvus_index_params == {"M": 16} and s.index.milvus_consistency == "Strong"
    monkeypatch.setenv("ADVPLUGIN_INDEX__MILVUS_URI", "http://milvus:19530")
    assert Settings(data_dir=tmp_path).index.milvus_uri == "http://milvus:19530"
    # The library default: a temporary milvus-lite folder of this process, never the repository.
    assert backend().uri == CLIENTS.temporary_uri()


def test_an_existing_collection_of_another_shape_is_not_adopted() -> None:
    """A backend meeting its gallery's collection made for another dimension or index type
    (the scheme or the configuration changed) refuses it; the follower's rebuild replaces it."""
    backend("reshaped").add(np.arange(1, 4), unit(3, 5))
    wider = create_index_backend("milvus", dim=2 * DIM, config=IndexConfig(backend="milvus"))
    wider.bind(lambda: "reshaped")
    with pytest.raises(ValueError, match="dimension"):
        wider.search(np.ones((1, 2 * DIM), np.float32), 1)
    with pytest.raises(ValueError, match="FLAT index, configured: HNSW"):
        backend("reshaped", milvus_index_type="HNSW").ids()
    wider.rebuild([(np.arange(1, 3), np.eye(2, 2 * DIM, dtype=np.float32))], n_expected=2)
    np.testing.assert_array_equal(wider.ids(), [1, 2])
