"""The search index of a collection: a cache of SQL that follows the change log and can
always be rebuilt.

Storage and search belong to a pluggable backend (`advplugin.gallery.backends`: FAISS flat,
IVF and HNSW today); this module keeps any backend consistent with the gallery, so that
consistency and crash safety are written once.

Consistency with SQL: the index remembers the last `template_changes.seq` it applied.
`catch_up` replays every later change set-wise: a touched id is made present iff it exists in
SQL now, with its current vector (backends upsert and ignore removals of ids they lack), so
replay is idempotent and order-safe. A snapshot (one file, written atomically) stores the
backend's state with that seq; on start the newer changes are replayed. A crash after an SQL
commit and before the index write therefore loses nothing and resurrects nothing. If the
snapshot is missing, unreadable, from another database or backend, or disagrees with SQL in
size after replay, the index is rebuilt from SQL. A backend that cannot apply an update in
place (HNSW) asks for a rebuild, which happens before the next search.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from advplugin.gallery.backends import Batch, IndexBackend, IndexConfig, create_index_backend
from advplugin.gallery.database import DEFAULT_COLLECTION
from advplugin.gallery.snapshot import UNREADABLE, read_snapshot, write_snapshot
from advplugin.gallery.store import Gallery
from advplugin.gallery.subject_map import SubjectMap
from advplugin.protectors.base import l2_normalize

__all__ = ["SNAPSHOT_VERSION", "IndexConfig", "IndexFollower", "TemplateIndex"]

log = logging.getLogger(__name__)

#: 2: the header names the backend and its state is the backend's own blob.
SNAPSHOT_VERSION = 2
_REBUILD_CHUNK = 20_000


class TemplateIndex:
    """The search index of one collection. Thread-safe: a lock guards every operation.

    `gallery` is read for its templates, its change log and its snapshot sealer."""

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
        # Snapshot writes one at a time: two concurrent saves (an enrolment's `maybe_save`
        # and a delete's `save`) shared the temporary file, and the second rename failed
        # (FileNotFoundError, a 500); in order, so an older state never replaces a newer one.
        self._save_lock = threading.Lock()
        self._backend: IndexBackend = create_index_backend(self.config.backend, dim=dim, config=self.config)
        self._backend.bind(self._fingerprint)
        self._changes_since_snapshot = 0
        # A removal since the last snapshot: the next one overwrites the old file first.
        self._removed_since_snapshot = False
        self._synced = 0.0  # monotonic time of the last catch-up
        self._subjects = SubjectMap()  # template id -> subject, kept with the backend
        # Whether the map names every template the backend holds (true after a rebuild; a
        # loaded snapshot starts with an empty map, filled from SQL as searches meet ids).
        self._subjects_complete = True

    def _fingerprint(self) -> str:
        """Identifies the database + collection a snapshot belongs to (no secrets: the URL
        is rendered without password and hashed)."""
        url = self.gallery.engine.url.render_as_string(hide_password=True)
        cid = self.gallery.collection_id(self.collection)
        return hashlib.sha256(f"{url}|{cid}".encode()).hexdigest()[:16]

    # -- rebuild ---------------------------------------------------------------------------------
    def _sql_batches(self) -> Iterator[Batch]:
        for batch in self.gallery.iter_templates(collection=self.collection, chunk_size=_REBUILD_CHUNK):
            self._subjects.set(batch.ids, batch.subjects)
            yield batch.ids, l2_normalize(batch.vectors)

    def rebuild(self) -> None:
        """Rebuild from SQL (the source of truth)."""
        with self._lock:
            seq = self.gallery.last_change_seq(collection=self.collection)
            n = self.gallery.count_templates(collection=self.collection)
            self._subjects.clear()
            self._subjects_complete = False  # until the backend has read every batch
            self._backend.rebuild(self._sql_batches(), n_expected=n)
            self._subjects_complete = True
            # Changes committed during the scan are replayed (idempotently) from `seq` on.
            self.last_seq = seq
            self._catch_up_locked()
            log.info("index %s rebuilt from SQL: %d templates", self.collection, self.size)

    # -- replay ----------------------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply every SQL change newer than `last_seq`; returns how many were applied."""
        with self._lock:
            return self._catch_up_locked()

    def rebuild_if_gone_back(self, latest: Callable[[], int]) -> bool:
        """Rebuild from SQL when the gallery's newest change (`latest()`, read under this
        index's lock) is older than what this index applied: the database went back (restored
        from a backup under a running service), and the numbers after it will be given to
        other changes, which a replay from `last_seq` would skip. Read under the lock, a change
        this process commits and applies meanwhile cannot pass for that."""
        with self._lock:
            newest = latest()
            if newest >= self.last_seq:
                return False
            log.warning("index %s: the change log went back (%d < %d): rebuilding from SQL",
                        self.collection, newest, self.last_seq)
            self.rebuild()
            return True

    def sync(self) -> None:
        """Catch up unless that was done less than `sync_interval` ago: the staleness bound
        searches promise for other processes' writes, without a SQL query per search. With
        a follower running (`IndexFollower`) it has always looked recently: nothing to do here."""
        if time.monotonic() - self._synced < self.config.sync_interval:
            return
        with self._lock:
            if time.monotonic() - self._synced >= self.config.sync_interval:
                self._catch_up_locked()

    @property
    def changes_since_snapshot(self) -> int:
        """Changes applied since this index last saved a snapshot, or since it was made (after
        `load`: the changes replayed on top of the snapshot, which the file lacks). Read-only."""
        return self._changes_since_snapshot

    def looked(self, at: float) -> None:
        """A follower saw no change for this index as of monotonic time `at`."""
        self._synced = max(self._synced, at)

    def _catch_up_locked(self) -> int:
        self._synced = time.monotonic()
        applied = 0
        while True:
            changes = self.gallery.changes_since(self.last_seq, collection=self.collection)
            if not changes:
                break
            touched = sorted({c.template_id for c in changes})
            self._apply(touched, self.gallery.get_templates(touched))
            self.last_seq = changes[-1].seq
            applied += len(changes)
        if applied:
            self._changes_since_snapshot += applied
            if self._backend.needs_rebuild:
                self.rebuild()
        return applied

    def _apply(self, touched: list[int], current: dict[int, tuple[str, np.ndarray]]) -> None:
        """Make every touched id hold exactly its current SQL state."""
        gone = [i for i in touched if i not in current]
        present = [i for i in touched if i in current]
        if gone:
            self._backend.remove(np.asarray(gone, np.int64))
            self._removed_since_snapshot = True
            self._subjects.remove(gone)
        if present:
            self._subjects.set(present, [current[i][0] for i in present])
            vectors = l2_normalize(np.stack([current[i][1] for i in present]).astype(np.float32))
            self._backend.add(np.asarray(present, np.int64), vectors)

    # -- search --------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._backend.size

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine, ids) per probe, best first; ids -1 and scores -inf where fewer than
        k templates exist."""
        q = l2_normalize(np.ascontiguousarray(probes, np.float32))
        with self._lock:
            self.sync()
            return self._backend.search(q, k)

    def search_subjects(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`search`, plus the subject code of every hit (-1 where none), read under the same
        lock: a delete cannot fall between finding a template and naming its subject."""
        q = l2_normalize(np.ascontiguousarray(probes, np.float32))
        with self._lock:
            self.sync()
            scores, ids = self._backend.search(q, k)
            return scores, ids, self._codes_locked(ids)

    def search_best_subject(self, probe: np.ndarray, k: int) -> tuple[float, int, int]:
        """`search_subjects` for ONE probe, reduced to its best candidate: (score, template
        id, subject code, -1 where none), under the same lock. The other candidates' codes are
        not gathered: right after a scan of the whole index every array operation runs on cold
        caches (docs/performance.md), and the usual identification needs only the best."""
        q = l2_normalize(np.ascontiguousarray(probe, np.float32))
        with self._lock:
            self.sync()
            scores, ids = self._backend.search(q, k)
            tid = ids.item(0)
            code = self._subjects.code(tid)
            if code < 0 and tid >= 0 and not self._subjects_complete:  # named from SQL
                code = self._codes_locked(ids[:1, :1]).item(0)
            return scores.item(0), tid, code

    def subjects(self, ids: np.ndarray) -> np.ndarray:
        """Subject codes of template ids (any shape; -1 for ids that do not exist)."""
        with self._lock:
            return self._codes_locked(np.asarray(ids, np.int64))

    def subject_name(self, code: int) -> str:
        return self._subjects.name(int(code))

    def _codes_locked(self, ids: np.ndarray) -> np.ndarray:
        codes = self._subjects.codes(ids)
        if self._subjects_complete:  # every held id is named: a -1 code means a -1 id
            return codes
        missing = (ids >= 0) & (codes < 0)
        if missing.any():  # after a snapshot load the map starts empty: fill it from SQL
            unknown = np.unique(ids[missing])
            # An id deleted in SQL is absent here and stays unnamed (-1): skipped by callers.
            names = self.gallery.template_subjects(unknown.tolist())
            self._subjects.set(list(names), list(names.values()))
            codes = self._subjects.codes(ids)
        return codes

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found ids int64 [M], their stored vectors float32 [M, dim], L2-normalised): the
        ids of `ids` the index holds, in the order given. An id the index no longer holds is
        left out rather than raising: a delete may land between a `search` and this call
        (each takes the lock on its own), and the candidate is then simply gone."""
        with self._lock:
            return self._backend.vectors(np.asarray(ids, np.int64))

    def ids(self) -> np.ndarray:
        """Every searchable id, sorted (for consistency checks against SQL)."""
        with self._lock:
            return self._backend.ids()

    # -- snapshots -------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the snapshot (atomically, see `advplugin.gallery.snapshot`) with the seq it
        contains. Nothing to do without a path or for a backend that cannot persist."""
        if self.snapshot_path is None or not self._backend.persistent:
            return
        sealer = self.gallery.snapshot_sealer()  # sealed gallery: sealed snapshot, never plaintext
        with self._save_lock:
            with self._lock:
                meta = {
                    "version": SNAPSHOT_VERSION, "backend": self._backend.name, "dim": self.dim,
                    "last_seq": self.last_seq, "fingerprint": self._fingerprint(),
                    "last_change": self.gallery.change_stamp(self.last_seq, collection=self.collection),
                }
                blob = self._backend.serialize()
                self._changes_since_snapshot = 0
                shred, self._removed_since_snapshot = self._removed_since_snapshot, False
            write_snapshot(self.snapshot_path, blob, meta, sealer=sealer, shred_previous=shred)

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
        path = self.snapshot_path
        if path is None or not self._backend.persistent or not path.is_file():
            return False
        try:
            sealer = self.gallery.snapshot_sealer()
            meta, blob = read_snapshot(path, sealer=sealer)
            valid = (
                # A sealed gallery never trusts a plaintext snapshot (one from before it was
                # sealed, or one planted): rebuilt from SQL and then written sealed.
                (sealer is None or "sealed" in meta) and
                meta.get("version") == SNAPSHOT_VERSION
                and meta.get("backend") == self._backend.name
                and meta.get("dim") == self.dim
                and meta.get("fingerprint") == self._fingerprint()
                and int(meta["last_seq"]) <= self.gallery.last_change_seq(collection=self.collection)
                # The same change at that number (snapshots from before this check have none):
                # after a restore from a backup the numbers are given again to other changes.
                and (
                    "last_change" not in meta
                    or meta["last_change"] == self.gallery.change_stamp(int(meta["last_seq"]), collection=self.collection)
                )
            )
            if not valid:
                log.warning("index snapshot %s does not match this gallery; rebuilding", path)
                self._removed_since_snapshot = True  # overwrite it when the rebuild is saved
                return False
            backend = type(self._backend).deserialize(blob, dim=self.dim, config=self.config)
        except UNREADABLE as e:
            log.warning("index snapshot %s unreadable (%s); rebuilding", path, type(e).__name__)
            return False
        backend.bind(self._fingerprint)
        self._backend = backend
        self._subjects.clear()  # filled from SQL as searches return ids (`subjects`)
        self._subjects_complete = False
        self.last_seq = int(meta["last_seq"])
        return True


class IndexFollower:
    """Keeps the indexes of one gallery in step with other processes' writes from ONE
    background thread, so that a search never waits for a SQL round trip: catching up on
    the request path put a query on every few searches (at 1M templates, where a search
    takes 25 ms, every other one), measurably above the search itself on a loaded machine.

    It looks at the gallery's newest change (`ChangeWatch`: one cheap query for every
    collection) twice per `interval`; when the number moved, each index reads its own
    changes (`catch_up`). So the staleness bound for other processes' writes stays
    `interval`, searches find every index looked at within it (`TemplateIndex.sync` does
    nothing), and this process's own writes are applied when they commit, as before. One
    follower serves any number of collections: the service runs one."""

    def __init__(self, gallery: Gallery, interval: float) -> None:
        if interval <= 0:
            raise ValueError("a follower needs a positive interval")
        self.interval = interval
        self._watch = gallery.watch_changes()
        self._indexes: list[TemplateIndex] = []
        self._seen = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, index: TemplateIndex) -> None:
        self._indexes = [*self._indexes, index]  # replaced, not mutated: the thread iterates it
        self._seen = -1  # the new index has not been looked at by this follower yet
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval / 2):
                try:
                    self.look()
                except Exception as e:  # keep following; a search catches up itself meanwhile
                    log.warning("index follower: %s", type(e).__name__)
        finally:
            self._watch.close()

    def look(self) -> None:
        """One look: the newest change of the gallery, read without any index's lock
        (searches go on meanwhile); an index's lock only when there is something to apply."""
        at = time.monotonic()
        latest = self._watch.latest()
        indexes = self._indexes
        if latest != self._seen:
            for index in indexes:
                if latest < index.last_seq:  # went back, or this process wrote since `latest`
                    index.rebuild_if_gone_back(self._watch.latest)
                elif index.last_seq < latest:
                    index.catch_up()
            self._seen = latest
        for index in indexes:
            index.looked(at)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
