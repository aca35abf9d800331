"""The contract of a search backend, and the registry that names them.

A backend holds the vectors of ONE collection and answers nearest-neighbour queries; it knows
nothing of SQL, change logs or snapshot files. `TemplateIndex` (advplugin.gallery.index)
keeps a backend consistent with the gallery and decides when to snapshot or rebuild it, so a
new backend (an ANN library, a vector database, an encrypted index) implements only storage
and search, and gets crash safety and replay for free.

The contract, checked for every registered backend by tests/gallery/test_backends.py:

- Vectors are float32 and L2-normalised *by the caller*; scores are inner products, i.e.
  cosine similarities, so a backend's scores agree with `Protector.score`.
- `add` is an upsert and `remove` ignores ids it does not hold. The follower replays the
  change log set-wise (a touched id is made to hold its current SQL state), so replaying a
  change twice, or a change the backend already saw, must be harmless.
- `search` pads with id -1 and score -inf where fewer than k vectors exist, so callers need
  no special case for small galleries.
- `vectors(ids)` returns the ids it found with their vectors. A concurrent delete may remove
  an id between a search and the read of its vector; that id is simply left out, not an
  error (the caller re-reads it from SQL if it cares, or drops the candidate).
- A backend that cannot apply an update in place (HNSW cannot replace a vector) answers
  `needs_rebuild`; the follower then rebuilds it from SQL before anyone searches.
- Snapshots: `serialize()` returns the state to persist and `deserialize` restores it. A
  backend whose state lives elsewhere (a vector database server) may serialise a small
  handle instead of its vectors: replay after a restart is idempotent, so content newer
  than the snapshot's change-log position is harmless. One that cannot even do that sets
  `persistent = False`; the follower then writes no snapshot and rebuilds from SQL on start.

Backends are not thread-safe: `TemplateIndex` serialises every call under its lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar, Self, TypeVar

import numpy as np

from advplugin.registry import Registry

if TYPE_CHECKING:
    from advplugin.gallery.backends.config import IndexConfig

#: (ids int64 [n], L2-normalised vectors float32 [n, dim]): one chunk of a collection.
Batch = tuple[np.ndarray, np.ndarray]


class IndexBackend(ABC):
    """Vector storage and inner-product search for one collection (see the module docstring
    for the contract)."""

    #: The registry name; set by `register_index_backend`, recorded in snapshots.
    name: ClassVar[str]
    #: False: `serialize` cannot capture the state; the follower never snapshots it.
    persistent: ClassVar[bool] = True

    def __init__(self, *, dim: int, config: IndexConfig) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.config = config

    @property
    @abstractmethod
    def size(self) -> int:
        """How many vectors are searchable."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under ids, replacing the vector of an id already held (upsert)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Make ids unsearchable; ids not held are ignored."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [Q, k], ids int64 [Q, k]), best first; -inf / -1 where fewer than
        k vectors exist."""

    @abstractmethod
    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found ids int64 [M], their vectors float32 [M, dim]): the ids of `ids` this
        backend holds, in the order given; ids it does not hold (e.g. deleted since a
        search returned them) are left out."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Every searchable id, sorted (for consistency checks against SQL)."""

    @abstractmethod
    def rebuild(self, batches: Iterable[Batch], *, n_expected: int) -> None:
        """Replace the whole content by `batches` (the collection read from SQL). `n_expected`
        (their total, maybe slightly off under concurrent writes) sizes structures such as
        IVF centroids. Should leave the old content in place if reading `batches` fails."""

    def bind(self, namespace: Callable[[], str]) -> None:  # noqa: B027  (optional hook)
        """Told by `TemplateIndex`, before other calls, which gallery collection this backend
        serves: `namespace()` is a stable fingerprint of the database + collection (no
        secrets). A backend whose state lives outside the process (a vector database that
        replicas share) names its storage by it, so replicas of one deployment meet in one
        place and two galleries never do; it is a callable because computing it reads SQL,
        which only such a backend needs. In-process backends ignore it."""

    @property
    def needs_rebuild(self) -> bool:
        """True when an update could not be applied in place, or the structure degraded so
        far that rebuilding from SQL is worth it; the follower rebuilds before searching."""
        return False

    @abstractmethod
    def serialize(self) -> bytes:
        """The state a snapshot stores (or a handle to state kept elsewhere)."""

    @classmethod
    @abstractmethod
    def deserialize(cls, blob: bytes, *, dim: int, config: IndexConfig) -> Self:
        """A backend restored from `serialize`'s output; search-time parameters come from
        `config`, so they may change between runs. Raises ValueError if `blob` is unusable."""


def empty_results(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer of an empty backend: every slot padded."""
    return np.full((n_queries, k), -np.inf, np.float32), np.full((n_queries, k), -1, np.int64)


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise raw top-k results to the contract: exactly k columns, -inf where id is -1
    (libraries return their own sentinels, e.g. FAISS -3.4e38)."""
    if ids.shape[1] == k and ids.dtype == np.int64 and scores.dtype == np.float32 and ids.min() >= 0:
        return scores, ids  # the common full answer, as is: one check per request
    missing = ids < 0
    if missing.any():
        scores = np.where(missing, -np.inf, scores)
    scores = scores.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    if ids.shape[1] < k:
        pad = ((0, 0), (0, k - ids.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        ids = np.pad(ids, pad, constant_values=-1)
    return scores[:, :k], ids[:, :k]


INDEX_BACKENDS: Registry[IndexBackend] = Registry("index backend")

B = TypeVar("B", bound=type[IndexBackend])


def register_index_backend(name: str) -> Callable[[B], B]:
    """Class decorator: register a backend under `name` (also set as its `name`)."""
    register = INDEX_BACKENDS.register(name)

    def decorator(cls: B) -> B:
        cls.name = name
        register(cls)
        return cls

    return decorator


def create_index_backend(name: str, /, *, dim: int, config: IndexConfig) -> IndexBackend:
    """An empty backend by registry name, e.g. `create_index_backend("faiss-flat", dim=128,
    config=IndexConfig())`; unknown names fail listing the registered ones."""
    return INDEX_BACKENDS.create(name, dim=dim, config=config)


def index_backend_class(name: str, /) -> type[IndexBackend]:
    """The registered class (for its classmethods, e.g. `deserialize`); unknown names fail
    listing the registered ones."""
    factory = INDEX_BACKENDS.factory(name)
    if not (isinstance(factory, type) and issubclass(factory, IndexBackend)):
        raise TypeError(f"index backend {name!r} is not registered as an IndexBackend class")
    return factory


def list_index_backends() -> list[str]:
    return INDEX_BACKENDS.names()
