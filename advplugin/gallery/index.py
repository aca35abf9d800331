"""FAISS search index derived from the SQL gallery (a cache that can always be rebuilt).

Inner product on L2-normalised protected templates (= cosine, what `Protector.score` does):
- `flat` (default): `IndexIDMap2(IndexFlatIP)`, exact;
- `ivf`: `IndexIVFFlat` with a hash-table direct map (ids, removal and reconstruction work),
  trained at (re)build time and retrained when the gallery has grown fourfold since;
- `hnsw`: `IndexIDMap2(IndexHNSWFlat)`; HNSW cannot remove vectors, so deletions become
  tombstones filtered at search time and an update of an existing vector (key rotation)
  schedules a rebuild. The index is rebuilt when tombstones pass 10 %.

Consistency with SQL: the index remembers the last `template_changes.seq` it applied.
`catch_up` replays every later change (set-wise: a touched id is present iff it exists in
SQL now, with its current vector), so it is idempotent and order-safe. A snapshot (one file,
written atomically) stores the index with that seq; on start the newer changes are replayed.
A crash after an SQL commit and before the index write therefore loses nothing and
resurrects nothing. If the snapshot is missing, unreadable, from another database, or
disagrees with SQL in size after replay, the index is rebuilt from SQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from advplugin.gallery.store import DEFAULT_COLLECTION, Gallery
from advplugin.protectors.base import l2_normalize

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
_TOMBSTONE_LIMIT = 0.10


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "flat"  # flat | ivf | hnsw
    ivf_nlist: int = 0  # 0: about 4 * sqrt(N), at least 1
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    use_gpu: bool = True
    #: Searches re-read the SQL change log at most this often (seconds). Writes made through
    #: this process are applied at once (`catch_up` after each commit); the interval only
    #: bounds how stale a search may be for changes made by *other* processes.
    sync_interval: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind must be flat, ivf or hnsw, got {self.kind!r}")


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def new_faiss_index(dim: int, config: IndexConfig, n_expected: int = 0) -> faiss.Index:
    """An empty index of the configured kind (inner product; IVF still untrained)."""
    c = config
    if c.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if c.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = c.hnsw_ef_search
        return faiss.IndexIDMap2(inner)
    nlist = c.ivf_nlist or max(1, int(4 * np.sqrt(max(n_expected, 1))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = c.ivf_nprobe
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return ivf


class TemplateIndex:
    """The search index of one collection. Thread-safe: a lock guards every operation."""

    def __init__(
        self,
        gallery: Gallery,
        dim: int,
        *,
        collection: str = DEFAULT_COLLECTION,
        config: IndexConfig | None = None,
        snapshot_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.gallery = gallery
        self.dim = dim
        self.collection = collection
        self.config = config or IndexConfig()
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.last_seq = 0
        self._lock = threading.RLock()
        self._index: faiss.Index = self._empty(0)
        self._tombstones: set[int] = set()
        self._max_id = 0  # hnsw: ids above this were never added (SQL ids are never reused)
        self._dirty = False  # hnsw: an existing vector changed; rebuild before searching
        self._gpu_index: faiss.Index | None = None
        self._changes_since_snapshot = 0
        self._trained_on = 0  # ivf: templates the centroids were trained on
        self._synced = 0.0  # monotonic time of the last catch-up

    # -- construction --------------------------------------------------------------------------
    def _empty(self, n_expected: int) -> faiss.Index:
        return new_faiss_index(self.dim, self.config, n_expected)

    def _fingerprint(self) -> str:
        """Identifies the database + collection a snapshot belongs to (no secrets: the URL
        is rendered without password and hashed)."""
        url = self.gallery.engine.url.render_as_string(hide_password=True)
        cid = self.gallery.collection_id(self.collection)
        return hashlib.sha256(f"{url}|{cid}".encode()).hexdigest()[:16]

    def rebuild(self) -> None:
        """Rebuild from SQL (the source of truth)."""
        with self._lock:
            seq = self.gallery.last_change_seq(collection=self.collection)
            n = self.gallery.count_templates(collection=self.collection)
            index = self._empty(n)
            if self.config.kind == "ivf":
                index.train(self._training_sample(index.nlist))
                self._trained_on = n
            max_id = 0
            for batch in self.gallery.iter_templates(collection=self.collection, chunk_size=20_000):
                index.add_with_ids(l2_normalize(batch.vectors), batch.ids)
                max_id = int(batch.ids[-1])
            self._index, self._tombstones, self._max_id, self._dirty = index, set(), max_id, False
            self._gpu_index = None
            # Changes committed during the scan are replayed (idempotently) from `seq` on.
            self.last_seq = seq
            self._catch_up_locked()
            log.info("index %s rebuilt from SQL: %d templates", self.collection, self.size)

    def _training_sample(self, nlist: int) -> np.ndarray:
        want = max(nlist * 39, 1)
        parts, got = [], 0
        for batch in self.gallery.iter_templates(collection=self.collection, chunk_size=20_000):
            parts.append(l2_normalize(batch.vectors))
            got += len(batch)
            if got >= want:
                break
        if got < nlist:
            # Too few templates to train nlist centroids: random unit vectors keep the
            # index usable (it is rebuilt with real data later).
            rng = np.random.default_rng(0)
            parts.append(l2_normalize(rng.normal(size=(nlist - got, self.dim)).astype(np.float32)))
        return np.concatenate(parts)

    # -- replay ----------------------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply every SQL change newer than `last_seq`; returns how many were applied."""
        with self._lock:
            return self._catch_up_locked()

    def sync(self) -> None:
        """Catch up unless that was done less than `sync_interval` ago: the staleness bound
        searches promise for other processes' writes, without a SQL query per search."""
        with self._lock:
            if time.monotonic() - self._synced >= self.config.sync_interval:
                self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        self._synced = time.monotonic()
        applied = 0
        while True:
            changes = self.gallery.changes_since(self.last_seq, collection=self.collection)
            if not changes:
                break
            touched = sorted({c.template_id for c in changes})
            current = self.gallery.get_templates(touched)
            self._apply(touched, current)
            self.last_seq = changes[-1].seq
            applied += len(changes)
        if applied:
            self._gpu_index = None
            self._changes_since_snapshot += applied
            if self._dirty or len(self._tombstones) > _TOMBSTONE_LIMIT * max(self._index.ntotal, 1):
                self.rebuild()
            elif self.config.kind == "ivf" and self.size >= 1000 and self.size > 4 * self._trained_on:
                self.rebuild()  # the gallery outgrew its centroids: retrain (geometric, so rare)
        return applied

    def _apply(self, touched: list[int], current: dict[int, tuple[str, np.ndarray]]) -> None:
        ids = np.asarray(touched, np.int64)
        if self.config.kind == "hnsw":
            old = [i for i in touched if i <= self._max_id]
            for i in old:
                if i in current:
                    self._dirty = True  # an existing vector changed: HNSW cannot update it
                else:
                    self._tombstones.add(i)
            new = [i for i in touched if i > self._max_id and i in current]
        else:
            self._index.remove_ids(ids)
            new = [i for i in touched if i in current]
        if new:
            vecs = l2_normalize(np.stack([current[i][1] for i in new]).astype(np.float32))
            if self.config.kind == "ivf" and not self._index.is_trained:
                self._index.train(vecs)
            self._index.add_with_ids(vecs, np.asarray(new, np.int64))
            self._max_id = max(self._max_id, max(new))

    # -- search --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self._index.ntotal) - len(self._tombstones)

    def _searcher(self) -> faiss.Index:
        if self.config.use_gpu and self.config.kind == "flat" and gpu_count() > 0:
            if self._gpu_index is None:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            return self._gpu_index
        return self._index

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine, ids) per probe; ids are -1 where fewer than k templates exist."""
        q = l2_normalize(np.ascontiguousarray(probes, np.float32))
        with self._lock:
            self.sync()
            if self.size == 0:
                return np.zeros((len(q), k), np.float32), np.full((len(q), k), -1, np.int64)
            extra = len(self._tombstones)
            scores, ids = self._searcher().search(q, min(k + extra, self._index.ntotal))
        if extra:
            keep = ~np.isin(ids, list(self._tombstones))
            ids = np.where(keep, ids, -1)
            order = np.argsort(~keep, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            scores = np.take_along_axis(np.where(keep, scores, -np.inf), order, axis=1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores[:, :k], ids[:, :k]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored (normalised, protected) vectors of ids present in the index."""
        with self._lock:
            return self._index.reconstruct_batch(np.asarray(ids, np.int64))

    def ids(self) -> np.ndarray:
        """Every searchable id (for consistency checks against SQL)."""
        with self._lock:
            if self.config.kind == "ivf":
                inv = self._index.invlists
                parts = [
                    faiss.rev_swig_ptr(inv.get_ids(li), inv.list_size(li)).copy()
                    for li in range(inv.nlist)
                    if inv.list_size(li)
                ]
                all_ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            else:
                all_ids = faiss.vector_to_array(self._index.id_map)
            if self._tombstones:
                all_ids = all_ids[~np.isin(all_ids, list(self._tombstones))]
            return np.sort(all_ids.astype(np.int64))

    # -- snapshots -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the snapshot atomically (temp file, fsync, rename): a crash leaves either the
        old or the new snapshot, each with the seq it really contains."""
        if self.snapshot_path is None:
            return
        with self._lock:
            meta = {
                "version": SNAPSHOT_VERSION, "kind": self.config.kind, "dim": self.dim,
                "last_seq": self.last_seq, "fingerprint": self._fingerprint(),
                "max_id": self._max_id, "tombstones": sorted(self._tombstones),
                "trained_on": self._trained_on,
            }
            blob = faiss.serialize_index(self._index)
            self._changes_since_snapshot = 0
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_path.with_name(self.snapshot_path.name + ".tmp")
        buf = io.BytesIO()
        np.savez(buf, index=blob, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)

    def maybe_save(self, every: int) -> None:
        if self._changes_since_snapshot >= every:
            self.save()

    def load(self) -> bool:
        """Load the snapshot and replay newer changes; on any mismatch rebuild from SQL.
        Returns True when the snapshot was usable."""
        with self._lock:
            ok = self._load_snapshot()
            if ok:
                self._catch_up_locked()
                n_sql = self.gallery.count_templates(collection=self.collection)
                if n_sql != self.size:
                    log.warning("index snapshot disagrees with SQL (%d vs %d); rebuilding", self.size, n_sql)
                    ok = False
            if not ok:
                self.rebuild()
            return ok

    def _load_snapshot(self) -> bool:
        if self.snapshot_path is None or not self.snapshot_path.is_file():
            return False
        try:
            with np.load(self.snapshot_path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                blob = data["index"]
                valid = (
                    meta.get("version") == SNAPSHOT_VERSION
                    and meta.get("kind") == self.config.kind
                    and meta.get("dim") == self.dim
                    and meta.get("fingerprint") == self._fingerprint()
                    and int(meta["last_seq"]) <= self.gallery.last_change_seq(collection=self.collection)
                )
                if not valid:
                    log.warning("index snapshot %s does not match this gallery; rebuilding", self.snapshot_path)
                    return False
                index = faiss.deserialize_index(blob)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("index snapshot %s unreadable (%s); rebuilding", self.snapshot_path, type(e).__name__)
            return False
        if self.config.kind == "ivf":
            index.nprobe = self.config.ivf_nprobe
        elif self.config.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.config.hnsw_ef_search
        self._index = index
        self.last_seq = int(meta["last_seq"])
        self._max_id = int(meta.get("max_id", 0))
        self._tombstones = {int(i) for i in meta.get("tombstones", [])}
        self._trained_on = int(meta.get("trained_on", 0))
        self._dirty = False
        self._gpu_index = None
        return True
