"""One contract every registered index backend must satisfy (parametrised over the registry,
like tests/protectors/test_contract.py, so a new backend is tested without a new test), then
the configuration that selects a backend, including the environment variables of releases
before backends were pluggable."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from advplugin.gallery.backends import (
    IndexBackend,
    IndexConfig,
    create_index_backend,
    list_index_backends,
)
from advplugin.settings import Settings

DIM = 32
BACKENDS = list_index_backends()


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(name: str, **config: object) -> IndexBackend:
    # Exhaustive search parameters: the contract is about behaviour, not recall.
    cfg = IndexConfig(backend=name, ivf_nprobe=1024, hnsw_ef_search=256, use_gpu=False, **config)
    return create_index_backend(name, dim=DIM, config=cfg)


def filled(name: str, n: int = 200, seed: int = 0) -> tuple[IndexBackend, np.ndarray, np.ndarray]:
    backend, ids, vecs = make(name), np.arange(100, 100 + n, dtype=np.int64), unit(n, seed)
    backend.rebuild([(ids[: n // 2], vecs[: n // 2]), (ids[n // 2 :], vecs[n // 2 :])], n_expected=n)
    return backend, ids, vecs


def test_every_backend_is_contract_tested() -> None:
    assert {"faiss-flat", "faiss-ivf", "faiss-hnsw"} <= set(BACKENDS)


@pytest.mark.parametrize("name", BACKENDS)
class TestContract:
    def test_rebuild_then_self_matches_score_one(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        assert backend.size == len(ids) and backend.name == name
        np.testing.assert_array_equal(backend.ids(), ids)
        scores, found = backend.search(vecs[:20], 3)
        assert scores.shape == found.shape == (20, 3) and found.dtype == np.int64
        np.testing.assert_array_equal(found[:, 0], ids[:20])
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first

    def test_add_to_empty_and_search(self, name: str) -> None:
        backend, vecs = make(name), unit(50, 1)
        backend.add(np.arange(1, 51), vecs)
        assert backend.size == 50
        _, found = backend.search(vecs, 1)
        np.testing.assert_array_equal(found[:, 0], np.arange(1, 51))

    def test_remove_makes_ids_unsearchable(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        gone = ids[:10]
        backend.remove(np.concatenate([gone, [999_999]]))  # an id never held is ignored
        assert backend.size == len(ids) - 10
        _, found = backend.search(vecs[:10], 5)
        assert not np.isin(found, gone).any()
        np.testing.assert_array_equal(backend.ids(), ids[10:])
        backend.remove(gone)  # removing twice (a replayed change) changes nothing
        assert backend.size == len(ids) - 10

    def test_add_is_an_upsert(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        new = unit(1, 99)
        backend.add(ids[:1], new)
        if backend.needs_rebuild:  # cannot replace in place (HNSW): the old vector is hidden
            assert not np.isin(backend.search(vecs[:1], 5)[1], ids[:1]).any()
            return
        assert backend.size == len(ids)
        scores, found = backend.search(new, 1)
        assert found[0, 0] == ids[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(backend.vectors(ids[:1])[1], new, atol=1e-6)

    def test_replaying_what_is_held_is_harmless(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        backend.add(ids[:5], vecs[:5])
        assert backend.size == len(ids) and not backend.needs_rebuild
        np.testing.assert_array_equal(backend.ids(), ids)

    def test_vectors_returns_what_was_added(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        order = np.array([7, 3, 150, 0])
        found, got = backend.vectors(ids[order])
        np.testing.assert_array_equal(found, ids[order])
        assert got.dtype == np.float32 and got.shape == (4, DIM)
        np.testing.assert_allclose(got, vecs[order], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    def test_vectors_leaves_out_vanished_ids(self, name: str) -> None:
        """A delete between `search` and `vectors` (the matcher's race) is not an error."""
        backend, _, vecs = filled(name)
        _, found = backend.search(vecs[:1], 3)
        backend.remove(found[0, :1])
        got_ids, got = backend.vectors(np.concatenate([found[0], [123_456_789]]))
        np.testing.assert_array_equal(got_ids, found[0, 1:])
        np.testing.assert_allclose(got, vecs[got_ids - 100], atol=1e-6)
        none_ids, none = backend.vectors(found[0, :1])
        assert none_ids.shape == (0,) and none.shape == (0, DIM)

    def test_padding_when_k_exceeds_size(self, name: str) -> None:
        backend, ids, vecs = filled(name, n=6)
        scores, found = backend.search(vecs[:2], 10)
        assert found.shape == scores.shape == (2, 10)
        assert (found[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
        assert set(found[0, :6].tolist()) == set(ids.tolist())
        empty = make(name)
        scores, found = empty.search(vecs[:2], 3)
        assert (found == -1).all() and np.isneginf(scores).all()

    def test_snapshot_round_trip(self, name: str) -> None:
        backend, ids, vecs = filled(name)
        backend.remove(ids[:3])  # tombstones (HNSW) must survive the round trip too
        if not backend.persistent:
            pytest.skip(f"{name} keeps its state elsewhere (persistent = False)")
        config = IndexConfig(backend=name, ivf_nprobe=1024, hnsw_ef_search=256, use_gpu=False)
        restored = type(backend).deserialize(backend.serialize(), dim=DIM, config=config)
        assert restored.size == backend.size and restored.name == name
        np.testing.assert_array_equal(restored.ids(), backend.ids())
        for a, b in zip(backend.search(vecs, 5), restored.search(vecs, 5), strict=True):
            np.testing.assert_array_equal(a, b)
        restored.add(np.array([10_000]), unit(1, 5))  # still writable after restoring
        assert restored.search(unit(1, 5), 1)[1][0, 0] == 10_000

    def test_deserialize_refuses_garbage_and_other_dimensions(self, name: str) -> None:
        backend, _, _ = filled(name, n=20)
        if not backend.persistent:
            pytest.skip(f"{name} keeps its state elsewhere (persistent = False)")
        with pytest.raises(ValueError):
            type(backend).deserialize(b"not a snapshot", dim=DIM, config=backend.config)
        with pytest.raises(ValueError):
            type(backend).deserialize(backend.serialize(), dim=DIM * 2, config=backend.config)


def test_snapshot_of_another_backend_is_refused() -> None:
    flat, _, _ = filled("faiss-flat", n=20)
    hnsw = make("faiss-hnsw")
    with pytest.raises(ValueError, match="another index"):
        type(hnsw).deserialize(flat.serialize(), dim=DIM, config=hnsw.config)


def test_hnsw_asks_for_a_rebuild_past_ten_percent_tombstones() -> None:
    backend, ids, _ = filled("faiss-hnsw", n=100)
    backend.remove(ids[:10])
    assert not backend.needs_rebuild
    backend.remove(ids[10:11])
    assert backend.needs_rebuild


def test_ivf_asks_for_retraining_after_fourfold_growth() -> None:
    backend, _, _ = filled("faiss-ivf", n=300)
    backend.add(np.arange(10_000, 10_900), unit(900, 3))
    assert backend.size == 1200 and not backend.needs_rebuild
    backend.add(np.arange(20_000, 20_100), unit(100, 4))
    assert backend.needs_rebuild  # 1300 > 4 x 300 trained on
    backend.rebuild([(backend.ids(), backend.vectors(backend.ids())[1])], n_expected=1300)
    assert not backend.needs_rebuild


# -- configuration ---------------------------------------------------------------------------
def test_unknown_backend_fails_listing_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="faiss-flat, faiss-hnsw, faiss-ivf"):
        create_index_backend("nope", dim=DIM, config=IndexConfig())
    with pytest.raises(ValidationError, match="faiss-flat, faiss-hnsw, faiss-ivf"):
        IndexConfig(backend="nope")


@pytest.mark.parametrize(("short", "full"), [("flat", "faiss-flat"), ("ivf", "faiss-ivf"), ("hnsw", "faiss-hnsw")])
def test_short_names_are_aliases_and_stay_the_reported_kind(short: str, full: str) -> None:
    for config in (IndexConfig(backend=short), IndexConfig(kind=short), IndexConfig(backend=full)):
        assert config.backend == full and config.kind == short


def test_config_is_frozen_and_checked() -> None:
    with pytest.raises(ValidationError):
        IndexConfig().backend = "faiss-ivf"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        IndexConfig(ivf_nprobe=0)
    with pytest.raises(ValidationError):
        IndexConfig(hnsw_mm=16)  # a typo is an error, not a silently ignored field


def _clear_index_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(("ADVPLUGIN_INDEX", "ADVPLUGIN_IVF", "ADVPLUGIN_HNSW", "ADVPLUGIN_USE_GPU")):
            monkeypatch.delenv(name)


def test_settings_defaults_keep_the_service_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_index_env(monkeypatch)
    s = Settings()
    assert s.index == IndexConfig() and s.index.backend == "faiss-flat"
    assert s.index.sync_interval == 0.05 and s.index.use_gpu is True


def test_settings_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_index_env(monkeypatch)
    monkeypatch.setenv("ADVPLUGIN_INDEX__BACKEND", "faiss-hnsw")
    monkeypatch.setenv("ADVPLUGIN_INDEX__HNSW_M", "16")
    s = Settings()
    assert s.index.backend == "faiss-hnsw" and s.index.hnsw_m == 16 and s.index.kind == "hnsw"


def test_settings_documented_flat_environment_variables_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_index_env(monkeypatch)
    legacy = {
        "ADVPLUGIN_INDEX_KIND": "ivf", "ADVPLUGIN_IVF_NLIST": "64", "ADVPLUGIN_IVF_NPROBE": "8",
        "ADVPLUGIN_HNSW_M": "24", "ADVPLUGIN_HNSW_EF_SEARCH": "40", "ADVPLUGIN_USE_GPU": "false",
        "ADVPLUGIN_INDEX_SYNC_INTERVAL": "0.5",
    }
    for name, value in legacy.items():
        monkeypatch.setenv(name, value)
    assert Settings().index == IndexConfig(
        backend="faiss-ivf", ivf_nlist=64, ivf_nprobe=8, hnsw_m=24, hnsw_ef_search=40, use_gpu=False,
        sync_interval=0.5,
    )
    # Both spellings set: the nested (current) one wins, the others still apply.
    monkeypatch.setenv("ADVPLUGIN_INDEX__BACKEND", "faiss-hnsw")
    s = Settings()
    assert s.index.backend == "faiss-hnsw" and s.index.ivf_nprobe == 8


def test_settings_keyword_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_index_env(monkeypatch)
    monkeypatch.setenv("ADVPLUGIN_INDEX__IVF_NPROBE", "4")
    s = Settings(index={"backend": "ivf"})
    assert s.index.backend == "faiss-ivf" and s.index.ivf_nprobe == 4  # merged with the environment
    assert Settings(index_kind="hnsw").index.backend == "faiss-hnsw"  # the old keyword
    with pytest.raises(ValidationError, match="available"):
        Settings(index={"backend": "nope"})


def test_backend_class_lookup_for_snapshots() -> None:
    from advplugin.gallery.backends import index_backend_class

    assert index_backend_class("faiss-hnsw").name == "faiss-hnsw"
    with pytest.raises(ValueError, match="available: faiss-flat"):
        index_backend_class("nope")
