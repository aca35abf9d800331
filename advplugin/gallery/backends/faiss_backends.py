"""FAISS backends: `faiss-flat` (default, exact), `faiss-ivf`, `faiss-hnsw`.

Inner product on L2-normalised protected templates (= cosine, what `Protector.score` does):
- `faiss-flat`: `IndexIDMap2(IndexFlatIP)`, exact; cloned to every GPU for search when
  faiss-gpu sees one and `use_gpu` is set (re-cloned after each change);
- `faiss-ivf`: `IndexIVFFlat` with a hash-table direct map (ids, removal and reconstruction
  work), trained at (re)build time on the first chunks of the gallery, and asking for a
  rebuild (= retraining) once the gallery has grown fourfold since;
- `faiss-hnsw`: `IndexIDMap2(IndexHNSWFlat)`; HNSW cannot remove or replace vectors, so
  deletions become tombstones filtered at search time, and a replaced vector (key rotation)
  is tombstoned and asks for a rebuild. It also asks for one when tombstones pass 10 %.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Self

import faiss
import numpy as np

from advplugin.gallery.backends.base import (
    Batch,
    IndexBackend,
    empty_results,
    pad_results,
    register_index_backend,
)
from advplugin.gallery.backends.config import IndexConfig


@functools.cache
def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu). Asked once per process: a search asked it every
    time (a driver query, ~2 % of a template request's CPU in the service profile)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, np.int64).reshape(-1)


def _as_vectors(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, np.float32)


class FaissBackend(IndexBackend):
    """What the FAISS backends share: an index with ids, upsert as remove + add, and a
    snapshot made of the serialised index plus a little JSON state of the subclass."""

    def __init__(self, *, dim: int, config: IndexConfig) -> None:
        super().__init__(dim=dim, config=config)
        self._index = self._fresh(0)
        #: The largest id ever added. Ids above it are certainly not held, which spares the
        #: O(N) removal pass for new templates (SQL ids only grow, so that is every insert).
        self._max_id = -1

    # -- what subclasses define ----------------------------------------------------------------
    @abstractmethod
    def _new_index(self, n_expected: int) -> faiss.Index:
        """An empty index (IVF: still untrained) sized for about `n_expected` vectors."""

    @abstractmethod
    def _accepts(self, index: faiss.Index) -> bool:
        """Whether a deserialised index is of this backend's type and metric."""

    def _configure(self, index: faiss.Index) -> None:
        """Apply search-time parameters of the config (also to a restored snapshot, so they
        may change between runs)."""

    def _changed(self) -> None:
        """Called after every change of content (drop derived copies such as a GPU clone)."""

    def _state(self) -> dict[str, Any]:
        return {"max_id": self._max_id}

    def _restore(self, state: dict[str, Any]) -> None:
        self._max_id = int(state["max_id"])

    def _before_adding(self, index: faiss.Index, batches: Iterable[Batch]) -> Iterable[Batch]:
        """Hook of `rebuild` between creating the index and filling it (IVF trains here)."""
        return batches

    # -- the contract ---------------------------------------------------------------------------
    def _fresh(self, n_expected: int) -> faiss.Index:
        index = self._new_index(n_expected)
        self._configure(index)
        return index

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _as_ids(ids)
        if not len(ids):
            return
        maybe_held = ids[ids <= self._max_id]
        if len(maybe_held):
            self._index.remove_ids(maybe_held)
        self._insert(ids, _as_vectors(vectors))

    def _insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add_with_ids(vectors, ids)
        self._max_id = max(self._max_id, int(ids.max()))
        self._changed()

    def remove(self, ids: np.ndarray) -> None:
        ids = _as_ids(ids)
        if len(ids):
            self._index.remove_ids(ids)
            self._changed()

    def _searcher(self) -> faiss.Index:
        return self._index

    #: True where a search of k <= ntotal always finds k held ids (exact search): its answer
    #: then needs no check for -1 ids (`pad_results`).
    _always_k = False

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_vectors(queries)
        n = self._index.ntotal
        if n == 0 or k <= 0:
            return empty_results(len(q), max(k, 0))
        scores, ids = self._searcher().search(q, min(k, n))
        if k <= n and self._always_k:
            # Returned as is. Why it matters: right after a scan of the whole index the
            # CPU caches hold vectors, not the interpreter, and pad_results' one check cost
            # ~20 us there, 10 % of a 10k-template search (benchmarks/identify_overhead.py).
            return scores, ids
        return pad_results(scores, ids, k)

    def _reconstruct(self, i: int) -> np.ndarray | None:
        try:
            return self._index.reconstruct(int(i))
        except RuntimeError:  # FAISS reports an unknown id this way
            return None

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = _as_ids(ids)
        try:
            return ids, self._index.reconstruct_batch(ids)
        except RuntimeError:
            pass  # some id is not held (deleted since it was found): keep the others
        held = [(int(i), v) for i in ids if (v := self._reconstruct(i)) is not None]
        found = np.array([i for i, _ in held], np.int64)
        vecs = np.stack([v for _, v in held]) if held else np.zeros((0, self.dim), np.float32)
        return found, vecs

    def ids(self) -> np.ndarray:
        return np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))

    def rebuild(self, batches: Iterable[Batch], *, n_expected: int) -> None:
        index, max_id = self._fresh(n_expected), -1
        for ids, vectors in self._before_adding(index, batches):
            if len(ids):
                index.add_with_ids(_as_vectors(vectors), _as_ids(ids))
                max_id = max(max_id, int(np.max(ids)))
        # Swapped in only when complete: a failed read of SQL leaves the old content.
        self._index, self._max_id = index, max_id
        self._after_rebuild(n_expected)
        self._changed()

    def _after_rebuild(self, n_expected: int) -> None:
        """Reset what a rebuild makes obsolete (tombstones, training counts)."""

    def serialize(self) -> bytes:
        buf = io.BytesIO()
        state = json.dumps(self._state()).encode()
        np.savez(buf, index=faiss.serialize_index(self._index), state=np.frombuffer(state, np.uint8))
        return buf.getvalue()

    @classmethod
    def deserialize(cls, blob: bytes, *, dim: int, config: IndexConfig) -> Self:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as data:
                index = faiss.deserialize_index(data["index"])
                state = json.loads(bytes(data["state"]).decode())
        except (OSError, KeyError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"not a {cls.name} snapshot ({type(e).__name__})") from e
        backend = cls(dim=dim, config=config)
        if index.d != dim or not backend._accepts(index):
            raise ValueError(f"snapshot holds another index than {cls.name} of dimension {dim}")
        backend._index = index
        try:
            backend._restore(state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{cls.name} snapshot state is incomplete ({type(e).__name__})") from e
        backend._configure(index)
        backend._changed()
        return backend


def _inner(index: faiss.Index) -> faiss.Index | None:
    """The index an IndexIDMap2 wraps, or None for anything else."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None


@register_index_backend("faiss-flat")
class FaissFlat(FaissBackend):
    """Exact inner-product search; searched on the GPUs where faiss has them."""

    _gpu_index: faiss.Index | None = None
    _always_k = True

    def _new_index(self, n_expected: int) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _accepts(self, index: faiss.Index) -> bool:
        return isinstance(_inner(index), faiss.IndexFlatIP)

    def _changed(self) -> None:
        self._gpu_index = None

    def _searcher(self) -> faiss.Index:
        if self.config.use_gpu and gpu_count() > 0:
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            return self._gpu_index
        return self._index


@register_index_backend("faiss-ivf")
class FaissIVF(FaissBackend):
    """Inverted lists: trained centroids, `nprobe` of `nlist` lists visited per search."""

    #: Retrain once the gallery is this many times what the centroids were trained on (and
    #: at least RETRAIN_MIN): geometric growth, so retraining stays rare.
    RETRAIN_GROWTH = 4
    RETRAIN_MIN = 1000
    #: FAISS wants about 39 training points per centroid.
    POINTS_PER_CENTROID = 39

    def __init__(self, *, dim: int, config: IndexConfig) -> None:
        super().__init__(dim=dim, config=config)
        self._trained_on = 0  # templates the centroids were trained on

    def _new_index(self, n_expected: int) -> faiss.Index:
        nlist = self.config.ivf_nlist or max(1, int(4 * np.sqrt(max(n_expected, 1))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return ivf

    def _accepts(self, index: faiss.Index) -> bool:
        index = faiss.downcast_index(index)
        return isinstance(index, faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT

    def _configure(self, index: faiss.Index) -> None:
        index.nprobe = self.config.ivf_nprobe

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "trained_on": self._trained_on}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self._trained_on = int(state["trained_on"])

    def _train(self, index: faiss.Index, sample: np.ndarray) -> None:
        if len(sample) < index.nlist:
            # Too few templates to train nlist centroids: random unit vectors keep the index
            # usable (it is rebuilt with real data once the gallery has grown).
            rng = np.random.default_rng(0)
            noise = rng.normal(size=(index.nlist - len(sample), self.dim)).astype(np.float32)
            sample = np.concatenate([sample, noise / np.linalg.norm(noise, axis=1, keepdims=True)])
        index.train(sample)

    def _before_adding(self, index: faiss.Index, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Train on the first chunks (at least POINTS_PER_CENTROID per centroid), then add
        them and the rest: one pass over SQL."""
        want, buffered, got = max(index.nlist * self.POINTS_PER_CENTROID, 1), [], 0
        it = iter(batches)
        for ids, vectors in it:
            buffered.append((ids, vectors))
            got += len(ids)
            if got >= want:
                break
        sample = [_as_vectors(v) for _, v in buffered]
        self._train(index, np.concatenate(sample) if sample else np.zeros((0, self.dim), np.float32))
        yield from buffered
        yield from it

    def _after_rebuild(self, n_expected: int) -> None:
        self._trained_on = n_expected

    def _insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not self._index.is_trained:  # never rebuilt: train on what arrives first
            self._train(self._index, vectors)
        super()._insert(ids, vectors)

    @property
    def needs_rebuild(self) -> bool:
        return self.size >= self.RETRAIN_MIN and self.size > self.RETRAIN_GROWTH * self._trained_on

    def ids(self) -> np.ndarray:
        inv = self._index.invlists
        parts = [
            faiss.rev_swig_ptr(inv.get_ids(li), inv.list_size(li)).copy()
            for li in range(inv.nlist)
            if inv.list_size(li)
        ]
        return np.sort(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))


@register_index_backend("faiss-hnsw")
class FaissHNSW(FaissBackend):
    """Graph search. HNSW cannot remove or replace a vector: removals are tombstones (held,
    never returned) until a rebuild, which is asked for past TOMBSTONE_LIMIT or when a held
    vector must change."""

    TOMBSTONE_LIMIT = 0.10

    def __init__(self, *, dim: int, config: IndexConfig) -> None:
        super().__init__(dim=dim, config=config)
        self._tombstones: set[int] = set()
        self._stale = False  # a held vector changed: only a rebuild can apply that

    def _new_index(self, n_expected: int) -> faiss.Index:
        inner = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(inner)

    def _accepts(self, index: faiss.Index) -> bool:
        inner = _inner(index)
        return isinstance(inner, faiss.IndexHNSWFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT

    def _configure(self, index: faiss.Index) -> None:
        faiss.downcast_index(index.index).hnsw.efSearch = self.config.hnsw_ef_search

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "tombstones": sorted(self._tombstones), "stale": self._stale}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self._tombstones = {int(i) for i in state["tombstones"]}
        self._stale = bool(state["stale"])

    def _after_rebuild(self, n_expected: int) -> None:
        self._tombstones, self._stale = set(), False

    @property
    def size(self) -> int:
        return int(self._index.ntotal) - len(self._tombstones)

    @property
    def needs_rebuild(self) -> bool:
        return self._stale or len(self._tombstones) > self.TOMBSTONE_LIMIT * max(self._index.ntotal, 1)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _as_ids(ids), _as_vectors(vectors)
        new = ids > self._max_id
        for i, v in zip(ids[~new].tolist(), vectors[~new], strict=True):
            held = self._reconstruct(i)
            if held is None:
                new[ids == i] = True
            elif np.array_equal(held, v):
                self._tombstones.discard(i)  # a replay of what is held: searchable again
            else:
                self._tombstones.add(i)  # never return the old vector; the rebuild adds the new
                self._stale = True
        if new.any():
            self._insert(ids[new], vectors[new])

    def remove(self, ids: np.ndarray) -> None:
        for i in _as_ids(ids).tolist():
            if i <= self._max_id and i not in self._tombstones and self._reconstruct(i) is not None:
                self._tombstones.add(i)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._tombstones:
            return super().search(queries, k)
        # Ask for enough more that k live results remain after dropping tombstones.
        scores, ids = super().search(queries, k + len(self._tombstones))
        dead = np.isin(ids, list(self._tombstones))
        ids = np.where(dead, -1, ids)
        scores = np.where(dead, -np.inf, scores)
        order = np.argsort(dead, axis=1, kind="stable")  # live first, rank kept
        return pad_results(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1), k)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found, vecs = super().vectors(ids)
        live = ~np.isin(found, list(self._tombstones))
        return found[live], vecs[live]

    def ids(self) -> np.ndarray:
        held = super().ids()
        return held[~np.isin(held, list(self._tombstones))]
