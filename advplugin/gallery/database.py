"""The gallery's database handle: engine, serialised write transactions, collections.

Why a module of its own: every other part of the gallery (templates, subjects, the change
log, API keys, audit, sealing) needs exactly this and nothing else from the database; each
part holds a `Database` handle (composition, not inheritance), and
`advplugin.gallery.store.Gallery` builds them all over one.

Write transactions are serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite:
`BEGIN IMMEDIATE`), which makes change sequence numbers commit in order: a reader that has
seen change `n` has seen every change before it (see `advplugin.gallery.changelog`). It is
also what lets the gallery allocate ids itself (`next_ids`) without ever reusing one.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
from sqlalchemy import (
    Column,
    Connection,
    Dialect,
    Engine,
    create_engine,
    event,
    insert,
    make_url,
    select,
    text,
)

from advplugin.gallery.models import Collection, utcnow
from advplugin.gallery.schema import check_migrated

DEFAULT_COLLECTION = "default"
_PG_WRITE_LOCK = 0x61647670  # "advp": one advisory lock id for all gallery writers


#: SQLite files of a gallery: the database and the WAL/shared-memory files beside it.
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None: in memory, or not SQLite)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def restrict_sqlite_files(db_path: Path) -> None:
    """Owner-only modes (0600) on a gallery's SQLite files: they hold templates of real
    people (sealed or not) and API-key hashes. New files are created under an owner-only
    umask (`make_engine`), and SQLite gives `-wal`/`-shm`/`-journal` the database file's
    mode; this tightens the files of a gallery made before (0644 then)."""
    for suffix in SQLITE_SUFFIXES:
        f = db_path.with_name(db_path.name + suffix)
        try:
            if stat.S_IMODE(f.stat().st_mode) & 0o077:
                f.chmod(0o600)
        except FileNotFoundError:
            continue


@contextmanager
def _owner_only_umask() -> Iterator[None]:
    """Files SQLite creates in here are born 0600 (no moment with a wider mode). The umask is
    process-wide, so it is narrowed only around the connect call, under a lock."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


_UMASK_LOCK = threading.Lock()


def make_engine(url: str) -> Engine:
    """An engine with the settings the gallery relies on (SQLite: foreign keys, WAL, fsync,
    secure delete, owner-only files).

    `hide_parameters`: bound values (template vectors, API-key hashes) never appear in
    database error messages, which may reach logs and tracebacks.
    """
    if url.startswith("sqlite"):
        db_path = sqlite_path(url)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )

        @event.listens_for(engine, "do_connect")
        def _owner_only_connect(dialect, _record, cargs, cparams):  # type: ignore[no-untyped-def]
            with _owner_only_umask():
                dbapi_conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
            if db_path is not None:
                restrict_sqlite_files(db_path)
            return dbapi_conn

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged enrolment survives a crash of the process *and* the OS.
            cur.execute("PRAGMA synchronous=FULL")
            # Deleted content is overwritten with zeros, not left in free pages: with a
            # checkpoint after a delete (`Database.checkpoint`), a deleted template's bytes
            # leave the files. Many builds default to off; the gallery never relies on that.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            options = conn.get_execution_options()
            # FULL unless this transaction asked not to wait for the disk (`_write(durable=
            # False)`); switched before BEGIN, and only when it changes.
            sync = "FULL" if options.get("gallery_durable", True) else "NORMAL"
            if conn.info.get("synchronous", "FULL") != sync:
                conn.exec_driver_sql(f"PRAGMA synchronous={sync}")
                conn.info["synchronous"] = sync
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("gallery_write", False) else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


def wal_checkpoint(engine: Engine) -> bool:
    """SQLite: copy the WAL into the database and truncate it, so that content deleted (and,
    with secure_delete, zeroed) leaves the WAL's older frames too. Returns False when a reader
    kept part of the WAL busy (it is truncated at a later checkpoint); True elsewhere."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as conn:
        busy, _log, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    return not busy


def bound_value(column: Column, dialect: Dialect, value: object) -> object:
    """`value` as the column type's bind processor makes it for `dialect`: what an ORM insert
    would store, for bulk writes that hand plain tuples to the driver (the value is processed
    once per chunk, not once per row)."""
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return process(value) if process else value


# -- PostgreSQL binary COPY, built by numpy ---------------------------------------------------
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # signature, flags, no extension
_COPY_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"


@contextmanager
def _copy_in(conn: Connection, table: str, names: Sequence[str]) -> Iterator[Any]:
    """A binary `COPY table (names) FROM STDIN` on `conn`'s driver connection, in its
    transaction (psycopg's `Copy`)."""
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as cp:  # type: ignore[union-attr]
        yield cp


def pg_int4(v: int) -> bytes:
    return struct.pack(">i", v)


def pg_text(v: str | None) -> bytes | None:
    return None if v is None else v.encode()


def pg_timestamptz(v: datetime) -> bytes:
    """PostgreSQL's binary timestamptz: microseconds since 2000-01-01 UTC."""
    d = v - _PG_EPOCH
    return struct.pack(">q", (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds)


def pg_copy(conn: Connection, table: str, columns: Sequence[tuple[str, np.ndarray | bytes | None]]) -> None:
    """COPY rows into `table` in PostgreSQL's binary format, the whole payload built by numpy:
    no per-row Python and no per-value adaptation, which is what a COPY of plain tuples (and
    even more an INSERT) costs per row. Per-row columns are numpy arrays: int64 [n] (bigint)
    or uint8 [n, k] (bytea of k bytes, the same k on every row); chunk-wide columns are their
    binary value (`pg_int4`, `pg_text`, `pg_timestamptz`; None: NULL), written once into a
    constant block of every row. Runs in `conn`'s transaction."""
    n = next(len(v) for _, v in columns if isinstance(v, np.ndarray))
    fields: list[tuple[str, str]] = [("count", ">i2")]
    values: dict[str, object] = {"count": len(columns)}
    const = bytearray()

    def flush() -> None:
        if const:
            name = f"c{len(fields)}"
            fields.append((name, f"V{len(const)}"))
            values[name] = np.void(bytes(const))
            const.clear()

    for i, (_, v) in enumerate(columns):
        if isinstance(v, np.ndarray):
            flush()
            if v.ndim == 1:
                fields += [(f"n{i}", ">i4"), (f"v{i}", ">i8")]
                values[f"n{i}"], values[f"v{i}"] = 8, v
            else:
                k = v.shape[1]
                fields += [(f"n{i}", ">i4"), (f"v{i}", f"V{k}")]
                values[f"n{i}"], values[f"v{i}"] = k, np.ascontiguousarray(v, np.uint8).view(f"V{k}").ravel()
        else:
            const += _NULL if v is None else struct.pack(">i", len(v)) + v
    flush()
    rows = np.empty(n, np.dtype(fields))
    for name, value in values.items():
        rows[name] = value
    with _copy_in(conn, table, [c for c, _ in columns]) as cp:
        cp.write(_COPY_SIGNATURE)
        cp.write(memoryview(rows).cast("B"))
        cp.write(_COPY_TRAILER)


def pg_copy_rows(conn: Connection, table: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> None:
    """COPY rows of Python values into `table` (binary; `columns`: (name, PostgreSQL type)):
    for rows of variable-length values (names), where the driver's C row writer is several
    times cheaper than array parameters, which it escapes value by value."""
    with _copy_in(conn, table, [c for c, _ in columns]) as cp:
        cp.set_types([t for _, t in columns])
        for row in rows:
            cp.write_row(row)


class Database:
    """An open gallery database: the engine, and, for a transaction's handle, its one
    connection. Thread-safe (one engine, a connection per call). Every part of the gallery
    (`advplugin.gallery.store.Gallery`) holds one and runs its SQL through `read()` /
    `write()`; `transaction()` gives a handle bound to one write transaction, which the
    gallery hands to its parts, so that all of them run in it."""

    def __init__(
        self, engine: Engine, *, connection: Connection | None = None, collections: dict[str, int] | None = None
    ) -> None:
        self.engine = engine
        #: collection ids by name, committed ones only (shared by the handles of one gallery)
        self._collections: dict[str, int] = {} if collections is None else collections
        self._conn = connection  # set on a transaction's handle

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, upgrade: bool = False) -> Self:
        """Open the database at a SQLAlchemy URL. Raises `NotMigratedError` (saying what to
        run) unless it is at the newest schema revision; `upgrade=True` migrates it first."""
        engine = make_engine(url)
        try:
            if upgrade:
                from advplugin.gallery.schema import upgrade as run_upgrade

                run_upgrade(engine)
            check_migrated(engine)
        except Exception:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def in_transaction(self) -> bool:
        """Whether this handle is bound to a `transaction()` (whose owner commits it)."""
        return self._conn is not None

    def close(self) -> None:
        if self._conn is None:  # a transaction's handle does not own the engine
            self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def where(self) -> str:
        """The database's URL without its password, to name it in messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def checkpoint(self) -> bool:
        """`wal_checkpoint` of this gallery (not inside a transaction). Nothing to do on
        PostgreSQL (its WAL and dead tuples are why sealing shreds)."""
        return self._conn is not None or wal_checkpoint(self.engine)

    # -- transactions ----------------------------------------------------------------------
    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Database]:
        """ONE serialised write transaction: yields a handle bound to its connection, for
        the parts that must all run in it and for the caller's own statements
        (`connection`). Everything commits together or not at all. Why: a batch migration
        must commit a chunk's templates, their change-log rows and its own checkpoint
        atomically, or a crash could duplicate or lose a chunk. Inside a transaction,
        `transaction()` joins it.

        `durable=False`: the commit returns before the log reaches the disk (PostgreSQL
        `synchronous_commit = off` for this transaction, SQLite `synchronous=NORMAL` in WAL
        mode). A crash of the process loses nothing; a crash of the machine can undo the last
        such commits, whole and in order. Only for what may be lost that way: the answer
        budgets' counters (a few probes' worth), never templates, the change log or keys,
        whose numbers other processes rely on."""
        if self._conn is not None:
            yield self
            return
        with self.write(durable=durable) as conn:
            yield Database(self.engine, connection=conn, collections=self._collections)

    @property
    def connection(self) -> Connection:
        """The connection of the current `transaction()` (for the caller's own statements)."""
        if self._conn is None:
            raise RuntimeError("Gallery.connection exists only inside `with gallery.transaction()`")
        return self._conn

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """One serialised write transaction (see the module docstring for why); on a
        transaction's handle, that transaction. `durable`: see `transaction`."""
        if self._conn is not None:
            yield self._conn
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(gallery_write=True, gallery_durable=durable)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
                    if not durable:
                        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction (a consistent snapshot); on a transaction's handle, that
        transaction, so it reads its own uncommitted writes."""
        if self._conn is not None:
            yield self._conn
            return
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def next_ids(self, conn: Connection, table: str, n: int) -> list[int]:
        """`n` new contiguous ids of `table` (templates, subjects), in the caller's write
        transaction. Allocating first and inserting with explicit ids lets a chunk go in as
        one bulk statement without RETURNING (whose per-row fallback on SQLite and
        client-side query parsing on psycopg dominated the insert time), and lets the change
        log and a migration's chunk record name the chunk as one id range. Ids are never
        reused. PostgreSQL: one block of the column's sequence in one statement (every
        writer of these tables holds the write lock, so no other nextval lands inside it; a
        rolled-back block is skipped, never reused: sequences are not transactional). SQLite:
        inside the `BEGIN IMMEDIATE` write transaction, after both the largest id and
        AUTOINCREMENT's high-water mark."""
        if self.dialect == "postgresql":
            q = text(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"nextval(pg_get_serial_sequence('{table}', 'id')) + :n - 1)"
            )
            last = int(conn.scalar(q, {"n": n}))
            return list(range(last - n + 1, last + 1))
        last = conn.exec_driver_sql(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0), "  # noqa: S608
            f"coalesce((SELECT max(id) FROM {table}), 0))"
        ).scalar()
        return list(range(int(last) + 1, int(last) + 1 + n))

    # -- collections ---------------------------------------------------------------------------
    def collection_id(self, name: str = DEFAULT_COLLECTION, *, create: bool = True) -> int:
        """Id of a collection (tenant), creating it when missing and `create` is set."""
        if name in self._collections:
            return self._collections[name]
        with self.read() as conn:
            cid = conn.scalar(select(Collection.id).where(Collection.name == name))
        if cid is None:
            if not create:
                raise KeyError(f"no collection named {name!r}")
            with self.write() as conn:
                cid = conn.scalar(select(Collection.id).where(Collection.name == name))
                if cid is None:
                    cid = conn.scalar(
                        insert(Collection).values(name=name, created_at=utcnow()).returning(Collection.id)
                    )
        if self._conn is not None:
            # Not cached inside a transaction: the row may be its own uncommitted insert
            # (found again by a second call in it), which a rollback would take back.
            return int(cid)
        self._collections[name] = int(cid)
        return int(cid)

    def collections(self) -> list[str]:
        with self.read() as conn:
            return list(conn.scalars(select(Collection.name).order_by(Collection.id)))
