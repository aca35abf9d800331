"""The erasure key store: per-subject key material kept OUTSIDE the gallery database, so that
deleting a subject makes every copy of its templates unreadable, backups included.

Why: a key stored in the database is in every copy of the database. Sealed storage wraps
each subject's key under the gallery data key, so a dump or backup taken *before* a delete
still opens the deleted subject's templates for whoever also holds the (unchanged) master
key. Crypto-shredding needs a secret the copy lacks. Here every subject sealed since this
store exists gets a random 32-byte *erasure key* held only in this store; the key its
templates are sealed under is derived from both the subject key in the database and the
erasure key (`advplugin.gallery.sealing.Sealer`). Deleting the subject shreds its erasure
key: from then on no copy of the database, WAL, backup or snapshot can open its templates,
with any master key.

Entries are found by a random *reference* (16 bytes) kept inside the subject's sealed key in
the database, so the store alone says nothing about who is enrolled, and one store may serve
several galleries. Keys are made ahead in small pools (`take`), so enrolling a new subject
does not wait for a durable commit of the store each time.
Index snapshots get an erasure key each too (kind `snapshot`), shredded when a newer
snapshot replaces them: a copied snapshot file dies with the next snapshot.

Storage: any SQLAlchemy URL. The default is a SQLite file beside the master key, outside the
data folder (`erasure-keys.db`), 0600 in a 0700 folder, `secure_delete` on, and the WAL
checkpointed after every shred, so a shredded key leaves the file's live pages. Several
service replicas need one shared store: give them the URL of a small database of its own
(e.g. PostgreSQL) that is NOT backed up with the gallery, or with a short retention: a
backup of this store taken before a delete keeps that subject's erasure key (as a backup
of the master key keeps the data key). docs/sealed-storage.md, "Erasure".

Not the gallery (`advplugin.gallery.store.Gallery`, the template database) nor a part of it:
a separate database that the gallery's `Sealer` reaches through `SealState.erasure`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    func,
    inspect,
    select,
)

from advplugin.gallery.database import bound_value, make_engine, sqlite_path, wal_checkpoint
from advplugin.gallery.models import utcnow
from advplugin.keys import make_private_dir

#: Bytes of an erasure key and of a reference to one.
ERASURE_KEY_BYTES = 32
REF_BYTES = 16
_IN = 500  # references per IN (...) clause

_metadata = MetaData()
_keys = Table(
    "erasure_keys",
    _metadata,
    Column("ref", LargeBinary(REF_BYTES), primary_key=True),
    Column("secret", LargeBinary(ERASURE_KEY_BYTES), nullable=False),
    # "subject", or "snapshot:<scope>" (one live snapshot key per scope)
    Column("kind", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def random_pieces(n: int, size: int) -> list[bytes]:
    """`n` random byte strings of `size`, read from the OS's random source at once: a bulk
    migration makes thousands of keys, references and nonces per chunk, and one read each
    cost more than the cryptography itself."""
    data = secrets.token_bytes(n * size)
    return [data[i * size : (i + 1) * size] for i in range(n)]


#: Erasure keys made ahead, per process: a new subject takes one from the pool, so enrolling
#: does not wait for a durable commit of the store each time (one per POOL new subjects).
POOL = 64


class ErasureKeyStore:
    """Erasure keys by reference. Thread-safe (one engine); every call is its own committed
    transaction (durable before it returns: SQLite with synchronous=FULL)."""

    def __init__(self, engine: Engine, description: str) -> None:
        self.engine = engine
        self.description = description
        _metadata.create_all(engine)
        self._pool: list[tuple[bytes, bytes]] = []
        self._pool_lock = threading.Lock()
        self._refill: threading.Thread | None = None  # a bulk caller's next keys, being made

    @classmethod
    def open(cls, location: str | Path, *, create: bool = True) -> ErasureKeyStore:
        """A store at a SQLAlchemy URL, or a SQLite file at a path (its folder made 0700,
        the file 0600). Without `create`, a store that does not exist yet (no file; a
        database without the table) raises `ErasureStoreMissing` and nothing is made: a
        new, empty store beside a gallery that had one would hide the loss of the real one."""
        from advplugin.gallery.sealing import ErasureStoreMissing  # sealing imports this module

        loc = str(location)
        path = None if "://" in loc else Path(loc).absolute()
        if path is not None:
            if not create and not path.exists():
                raise ErasureStoreMissing(f"the erasure key store {path} does not exist")
            make_private_dir(path.parent)
            loc = f"sqlite:///{path}"
        engine = make_engine(loc)
        where = sqlite_path(loc)
        description = f"erasure key store {where}" if where else (
            "erasure key store " + engine.url.render_as_string(hide_password=True)
        )
        if not create and not inspect(engine).has_table(_keys.name):
            engine.dispose()
            raise ErasureStoreMissing(f"the {description} holds no erasure key table")
        return cls(engine, description)

    def close(self) -> None:
        """Shred the pooled keys no subject took, and release the engine's connections (the
        store stays usable: a later call reconnects)."""
        self._join_refill()
        with self._pool_lock:
            unused, self._pool = [r for r, _ in self._pool], []
        self.shred(unused)
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"ErasureKeyStore({self.description!r})"

    # -- keys ----------------------------------------------------------------------------------
    def create(self, refs: Sequence[bytes], *, kind: str = "subject") -> dict[bytes, bytes]:
        """New random erasure keys for `refs`, stored (committed) before they are returned,
        so a template is never sealed under a key the store could lose."""
        if not refs:
            return {}
        out = {bytes(r): s for r, s in zip(refs, random_pieces(len(refs), ERASURE_KEY_BYTES), strict=True)}
        # The driver's executemany with plain tuples: a migration creates one key per new
        # subject, and SQLAlchemy's per-row parameter handling cost more than the insert.
        ph = self._placeholder
        now = bound_value(_keys.c.created_at, self.engine.dialect, utcnow())
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO erasure_keys (ref, secret, kind, created_at) VALUES ({ph}, {ph}, {ph}, {ph})",  # noqa: S608 - placeholders only
                [(r, s, kind, now) for r, s in out.items()],
            )
        return out

    def take(self, n: int) -> list[tuple[bytes, bytes]]:
        """`n` new (reference, erasure key) pairs, already durable in the store: from the
        pool, refilled by one `create` of what is missing plus POOL. A bulk caller (more
        than POOL at once: a migration's chunk) has the next `n` made in the background
        meanwhile, so its next chunk finds its keys committed instead of waiting for the
        store's durable commit. A process that dies leaves its unused pool behind: random
        keys no subject refers to."""
        self._join_refill()
        with self._pool_lock:
            if len(self._pool) < n:
                self._pool.extend(self.create(random_pieces(n - len(self._pool) + POOL, REF_BYTES)).items())
            taken, self._pool = self._pool[:n], self._pool[n:]
            ahead = n - len(self._pool) if n > POOL else 0
            if ahead > 0 and self._refill is None:  # one refill at a time (close joins it)
                self._refill = threading.Thread(
                    target=self._refill_pool, args=(ahead,), name="erasure-keys", daemon=True
                )
                self._refill.start()
        return taken

    def _refill_pool(self, n: int) -> None:
        """Background: `n` more keys into the pool once committed. A failure adds nothing
        (the next `take` makes what it needs itself, and raises then)."""
        try:
            made = self.create(random_pieces(n, REF_BYTES))
        except Exception:  # retried in the foreground by the next take
            return
        with self._pool_lock:
            self._pool.extend(made.items())

    def _join_refill(self) -> None:
        with self._pool_lock:
            refill, self._refill = self._refill, None
        if refill is not None:
            refill.join()

    def get(self, refs: Iterable[bytes]) -> dict[bytes, bytes]:
        """{ref: erasure key} for the references still present (shredded ones are absent)."""
        wanted = list(dict.fromkeys(bytes(r) for r in refs))
        out: dict[bytes, bytes] = {}
        ph = self._placeholder
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), _IN):
                part = wanted[i : i + _IN]
                q = f"SELECT ref, secret FROM erasure_keys WHERE ref IN ({', '.join([ph] * len(part))})"  # noqa: S608 - placeholders only
                out.update({bytes(r): bytes(s) for r, s in conn.exec_driver_sql(q, tuple(part))})
        return out

    @property
    def _placeholder(self) -> str:
        return "?" if self.engine.dialect.paramstyle == "qmark" else "%s"

    def shred(self, refs: Iterable[bytes]) -> int:
        """Delete erasure keys (unknown references are ignored); returns how many went. On
        SQLite the freed cells are zeroed (secure_delete) and the WAL is checkpointed, so
        the key's bytes leave the store's files."""
        gone = list(dict.fromkeys(bytes(r) for r in refs))
        if not gone:
            return 0
        n = 0
        with self.engine.begin() as conn:
            for i in range(0, len(gone), _IN):
                n += conn.execute(delete(_keys).where(_keys.c.ref.in_(gone[i : i + _IN]))).rowcount
        wal_checkpoint(self.engine)
        return n

    def shred_kind_except(self, kind: str, keep: bytes) -> int:
        """Shred every key of `kind` but `keep` (older snapshot keys of one scope)."""
        with self.engine.connect() as conn:
            refs = [bytes(r) for r in conn.scalars(select(_keys.c.ref).where(_keys.c.kind == kind, _keys.c.ref != keep))]
        return self.shred(refs)

    def count(self, kind: str | None = None) -> int:
        """Keys held (of one kind): for `advplugin db status` and tests."""
        q = select(func.count()).select_from(_keys)
        if kind is not None:
            q = q.where(_keys.c.kind == kind)
        with self.engine.connect() as conn:
            return int(conn.scalar(q) or 0)
