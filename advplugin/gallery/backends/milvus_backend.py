"""`milvus`: the vectors of a collection in Milvus, for galleries that outgrow one machine.

One backend, two deployments, chosen by `IndexConfig.milvus_uri`:
- a Milvus server (`http://host:19530`, standalone or a cluster's proxy): the vectors live
  there, shared by every service replica of the deployment, and the server scales past one
  machine's memory (docs/milvus.md has the recipe);
- milvus-lite (a path ending in `.db`): embedded in this process, one process per folder;
  for tests and single-node use. It is a pure-Python engine: far slower than FAISS here
  (benchmarks/results/milvus.json), so it exists to develop and test against Milvus, not to
  serve a large gallery.

SQL stays the truth: `TemplateIndex` replays the change log into Milvus exactly as into FAISS
(upserts and deletes are idempotent), so the Milvus copy can always be rebuilt.

Layout: the backend addresses an ALIAS, `<prefix>_<fingerprint>` (the fingerprint of the
database + collection, `bind`), which points at a physical collection `<alias>_<token>`
(primary key INT64 = template id, auto_id off; FLOAT_VECTOR; metric IP). `rebuild` fills a
new physical collection and then swaps the alias, so replicas sharing the server keep
searching the old content meanwhile and never see a half-built collection.

Snapshots: Milvus keeps its own state, so `serialize` stores a handle (uri, alias, dim),
never vectors; `deserialize` reconnects, and the follower replays newer changes
(idempotent). Measured at 100k (docs/milvus.md): reconnecting takes well under a second where
re-uploading from SQL takes far longer, hence `persistent = True`. This relies on Milvus
acknowledging a write only once it is durable (its WAL), so its content is never older than
a snapshot taken after the write.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from advplugin.gallery.backends.base import (
    Batch,
    IndexBackend,
    empty_results,
    pad_results,
    register_index_backend,
)
from advplugin.gallery.backends.config import IndexConfig

_FORMAT = "advplugin-milvus-handle/1"
_ID, _VECTOR = "id", "vector"
#: Rows per upsert call (Milvus caps one gRPC message at 64 MiB; 128-d float32 x 5,000 is 2.5 MiB).
_UPSERT_CHUNK = 5_000
#: Milvus answers at most this many results per query or search.
_MAX_LIMIT = 16_384
#: Writes after which `flush` seals them: milvus-lite searches unsealed rows one by one in
#: Python (at 20k unsealed rows a search took 0.4 s, sealed 20 ms), and a server brute-forces
#: growing segments; a server also seals on its own, so this only bounds the worst case.
_FLUSH_EVERY = 1_024
#: Index types milvus-lite really builds. It accepts any other name (IVF_PQ, DISKANN, SCANN,
#: even a typo), reports the index as "Finished" and then fails in its background builder,
#: searching by brute force forever after: so a lite URI refuses them up front.
LITE_INDEX_TYPES = frozenset({"FLAT", "BRUTE_FORCE", "AUTOINDEX", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8"})


def is_lite(uri: str) -> bool:
    """Whether `uri` names a milvus-lite folder (pymilvus's own rule: a path ending in .db)."""
    return uri.endswith(".db")


def _redacted(uri: str) -> str:
    """`uri` without user:password (a handle is written to disk; the token lives in config)."""
    if is_lite(uri):
        return str(Path(uri).expanduser().absolute())
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Clients:
    """One MilvusClient per (uri, token) per process: starting milvus-lite for a folder, or a
    gRPC channel to a server, is not per-collection work. Also owns the temporary milvus-lite
    folder of a bare IndexConfig."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._temporary: Path | None = None

    def temporary_uri(self) -> str:
        with self._lock:
            if self._temporary is None:
                self._temporary = Path(tempfile.mkdtemp(prefix="advplugin-milvus-"))
                atexit.register(self._remove_temporary, self._temporary)
            return str(self._temporary / "milvus.db")

    @staticmethod
    def _remove_temporary(folder: Path) -> None:
        try:  # stop milvus-lite's server on it first (its own atexit would run after this)
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(folder / "milvus.db"))
        except ImportError:
            pass
        shutil.rmtree(folder, ignore_errors=True)

    def get(self, uri: str, token: str | None) -> Any:
        try:
            from pymilvus import MilvusClient  # imported lazily: only this backend needs it
        except ImportError as e:
            raise ImportError("the milvus index backend needs pymilvus: pip install 'advplugin[milvus]'") from e

        with self._lock:
            key = (uri, token)
            if key not in self._clients:
                self._clients[key] = MilvusClient(uri=uri, token=token or "")
            return self._clients[key]


CLIENTS = _Clients()


@register_index_backend("milvus")
class MilvusBackend(IndexBackend):
    """Inner-product search in a Milvus collection (see the module docstring)."""

    persistent = True

    def __init__(self, *, dim: int, config: IndexConfig) -> None:
        super().__init__(dim=dim, config=config)
        self.uri = config.milvus_uri or CLIENTS.temporary_uri()
        if is_lite(self.uri):
            Path(self.uri).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
            if config.milvus_index_type not in LITE_INDEX_TYPES:
                raise ValueError(
                    f"milvus-lite cannot build a {config.milvus_index_type} index (it would search by "
                    f"brute force); use one of {', '.join(sorted(LITE_INDEX_TYPES))} or a Milvus server"
                )
        token = config.milvus_token.get_secret_value() if config.milvus_token else None
        self._client = CLIENTS.get(self.uri, token)
        self._namespace: Callable[[], str] | None = None
        self._alias: str | None = None  # resolved on first use (`bind` may come first)
        self._ready = False  # the alias exists and its collection is loaded
        self._unflushed = 0

    # -- naming ---------------------------------------------------------------------------------
    def bind(self, namespace: Callable[[], str]) -> None:
        if self._alias is None:
            self._namespace = namespace

    @property
    def alias(self) -> str:
        """The stable name searched: prefix + gallery fingerprint, or a private name when not
        bound to a gallery (library use: nothing else may share it)."""
        if self._alias is None:
            ns = self._namespace() if self._namespace else f"private_{uuid.uuid4().hex}"
            self._alias = f"{self.config.milvus_collection_prefix}_{ns}"
        return self._alias

    def _ensure(self) -> str:
        """The alias, checked once per backend: an existing collection is loaded (Milvus
        starts collections released after a restart), a missing one created empty."""
        alias = self.alias
        if not self._ready:
            if self._client.has_collection(alias):
                self._adopt(alias)
            else:
                self._swap_in(self._create())
            self._ready = True
        return alias

    def _adopt(self, alias: str) -> None:
        """Use the existing collection behind `alias` if it is what this backend would have
        made (dimension, index type), loading it; ValueError otherwise (the follower then
        rebuilds, which makes a new one)."""
        fields = self._client.describe_collection(alias)["fields"]
        vector = next((f for f in fields if f["name"] == _VECTOR), None)
        if vector is None or int(vector["params"]["dim"]) != self.dim:
            raise ValueError(f"{self.name} collection is another index than {self.name} of dimension {self.dim}")
        index_type = self._client.describe_index(alias, _VECTOR)["index_type"]
        if index_type != self.config.milvus_index_type:  # configuration changed: rebuild with it
            raise ValueError(
                f"{self.name} collection has a {index_type} index, configured: {self.config.milvus_index_type}"
            )
        self._client.load_collection(alias)

    def _create(self) -> str:
        from pymilvus import DataType

        name = f"{self.alias}_{uuid.uuid4().hex[:12]}"
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_ID, DataType.INT64, is_primary=True)
        schema.add_field(_VECTOR, DataType.FLOAT_VECTOR, dim=self.dim)
        index = self._client.prepare_index_params()
        index.add_index(
            field_name=_VECTOR, index_type=self.config.milvus_index_type, metric_type="IP",
            params=dict(self.config.milvus_index_params),
        )
        self._client.create_collection(
            name, schema=schema, index_params=index, consistency_level=self.config.milvus_consistency
        )
        return name

    def _swap_in(self, name: str) -> None:
        """Point the alias at `name`; drop the collection it pointed at before (only that
        one: a replica rebuilding at the same time owns its own new collection)."""
        alias = self.alias
        exists = alias in self._client.list_aliases()["aliases"]
        old = self._client.describe_alias(alias)["collection_name"] if exists else None
        if old is None:
            self._client.create_alias(name, alias)
        else:
            self._client.alter_alias(name, alias)
            if old != name:
                self._client.drop_collection(old)

    # -- the contract ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        rows = self._client.query(
            self._ensure(), filter="", output_fields=["count(*)"], consistency_level=self.config.milvus_consistency
        )
        return int(rows[0]["count(*)"])

    def _upsert(self, collection: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        for s in range(0, len(ids), _UPSERT_CHUNK):
            rows = [
                {_ID: int(i), _VECTOR: v}
                for i, v in zip(ids[s : s + _UPSERT_CHUNK].tolist(), vectors[s : s + _UPSERT_CHUNK], strict=True)
            ]
            self._client.upsert(collection, rows)

    def _written(self, collection: str, n: int) -> None:
        self._unflushed += n
        if self._unflushed >= _FLUSH_EVERY:
            self._client.flush(collection)
            self._unflushed = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        if len(ids):
            alias = self._ensure()
            self._upsert(alias, ids, np.ascontiguousarray(vectors, np.float32))
            self._written(alias, len(ids))

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        if len(ids):
            alias = self._ensure()
            self._client.delete(alias, ids=ids.tolist())  # ids it lacks are ignored by Milvus
            self._written(alias, len(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, np.float32)
        if k <= 0 or not len(q):
            return empty_results(len(q), max(k, 0))
        hits = self._client.search(
            self._ensure(), data=q, limit=min(k, _MAX_LIMIT), output_fields=[_ID],
            search_params={"metric_type": "IP", "params": dict(self.config.milvus_search_params)},
            consistency_level=self.config.milvus_consistency,
        )
        width = max((len(h) for h in hits), default=0)
        scores = np.full((len(q), width), -np.inf, np.float32)
        ids = np.full((len(q), width), -1, np.int64)
        for row, found in enumerate(hits):
            for col, hit in enumerate(found):
                ids[row, col], scores[row, col] = hit["id"], hit["distance"]
        return pad_results(scores, ids, k)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        held: dict[int, np.ndarray] = {}
        alias = self._ensure() if len(ids) else ""
        unique = np.unique(ids).tolist()
        for s in range(0, len(unique), _MAX_LIMIT):
            rows = self._client.query(
                alias, ids=unique[s : s + _MAX_LIMIT], output_fields=[_VECTOR],
                consistency_level=self.config.milvus_consistency,
            )
            held.update((int(r[_ID]), np.asarray(r[_VECTOR], np.float32)) for r in rows)
        found = np.array([i for i in ids.tolist() if i in held], np.int64)
        vecs = np.stack([held[i] for i in found.tolist()]) if len(found) else np.zeros((0, self.dim), np.float32)
        return found, vecs

    def ids(self) -> np.ndarray:
        it = self._client.query_iterator(
            self._ensure(), batch_size=_MAX_LIMIT, filter="", output_fields=[_ID],
            consistency_level=self.config.milvus_consistency,
        )
        parts = []
        try:
            while batch := it.next():
                parts.append(np.fromiter((r[_ID] for r in batch), np.int64, len(batch)))
        finally:
            it.close()
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def rebuild(self, batches: Iterable[Batch], *, n_expected: int) -> None:
        new = self._create()
        try:
            for ids, vectors in batches:
                if len(ids):
                    self._upsert(new, np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(vectors, np.float32))
            self._client.flush(new)
        except BaseException:
            self._client.drop_collection(new)  # the old content stays searchable
            raise
        self._swap_in(new)
        self._ready, self._unflushed = True, 0

    def flush(self) -> None:
        """Seal what was written (benchmarks call it before measuring searches)."""
        self._client.flush(self._ensure())
        self._unflushed = 0

    # -- snapshots: a handle, not the vectors ---------------------------------------------------
    def serialize(self) -> bytes:
        # No count or other content: the follower replays from the snapshot's change-log
        # position and compares the size with SQL, and a shutdown must not need the server.
        handle = {"format": _FORMAT, "uri": _redacted(self.uri), "alias": self.alias, "dim": self.dim}
        return json.dumps(handle).encode()

    @classmethod
    def deserialize(cls, blob: bytes, *, dim: int, config: IndexConfig) -> Self:
        try:
            handle = json.loads(bytes(blob).decode())
            if handle.get("format") != _FORMAT:
                raise ValueError("not a milvus handle")
            alias, handle_uri, handle_dim = str(handle["alias"]), str(handle["uri"]), int(handle["dim"])
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a {cls.name} snapshot ({type(e).__name__})") from e
        if handle_dim != dim:
            raise ValueError(f"snapshot holds another index than {cls.name} of dimension {dim}")
        backend = cls(dim=dim, config=config)
        if _redacted(backend.uri) != handle_uri:
            raise ValueError(f"{cls.name} snapshot points at another Milvus than the configured one")
        if not backend._client.has_collection(alias):
            raise ValueError(f"{cls.name} collection of the snapshot is gone")
        backend._adopt(alias)
        backend._alias, backend._ready = alias, True
        return backend
