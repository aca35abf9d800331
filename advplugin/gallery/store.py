"""`Gallery`: data access to the protected-template database (SQLite or PostgreSQL).

Every method that changes templates writes the matching `template_changes` rows in the same
transaction, so the FAISS index (a cache) can always catch up by replaying them. Write
transactions are serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite:
`BEGIN IMMEDIATE`), which makes change sequence numbers commit in order: a reader that has
seen change `n` has seen every change before it.

Vectors are stored as float32 bytes of *protected* templates; this module refuses arrays
that are not float32-compatible [N, dim] and never logs or echoes vector values.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)

from advplugin.gallery.models import (
    ApiKey,
    Collection,
    Subject,
    Template,
    TemplateChange,
    utcnow,
)
from advplugin.gallery.schema import check_migrated
from advplugin.protectors.base import ProtectorMetadata, validate_embeddings

DEFAULT_COLLECTION = "default"
_PG_WRITE_LOCK = 0x61647670  # "advp": one advisory lock id for all gallery writers
_IN_CHUNK = 500  # ids per IN (...) clause, well under every driver's parameter limit

# PostgreSQL bulk insert of one chunk in one statement: the vectors travel as ONE bytea
# parameter (binary, no escaping) cut into rows by the server, the other per-row values as
# arrays, per-chunk values once. No per-row SQL text is built or parsed on either side.
_PG_INSERT_TEMPLATES = text(
    """
    INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version,
        key_id, extractor_name, extractor_version, image_sha256, image, created_at, updated_at)
    SELECT u.id, u.subject_id, :collection_id,
        substring(CAST(:vectors AS BYTEA) FROM CAST((u.n - 1) * :nbytes + 1 AS INTEGER)
                  FOR CAST(:nbytes AS INTEGER)),
        :dim, :scheme, :scheme_version, :key_id, :extractor_name, :extractor_version,
        u.image_sha256, u.image, :created_at, :updated_at
    FROM unnest(CAST(:id AS BIGINT[]), CAST(:subject_id AS BIGINT[]),
                CAST(:image_sha256 AS VARCHAR[]), CAST(:image AS BYTEA[]))
        WITH ORDINALITY AS u(id, subject_id, image_sha256, image, n)
    ORDER BY u.n
    """
)

_PG_INSERT_SUBJECTS = text(
    "INSERT INTO subjects (collection_id, name, created_at) "
    "SELECT :cid, unnest(CAST(:names AS VARCHAR[])), :now"
)
# One unique-index probe per name, whatever the planner's statistics say: with `name IN
# (...)` a bulk load that outran autovacuum's ANALYZE got a plan that filtered every subject
# of the collection against the whole list, a cost that grew with the table (O(N^2) overall).
_PG_FIND_SUBJECTS = text(
    "SELECT n.name, s.id FROM unnest(CAST(:names AS VARCHAR[])) AS n(name) "
    "CROSS JOIN LATERAL (SELECT id FROM subjects WHERE collection_id = :cid AND name = n.name) AS s"
)


class SubjectNotFound(KeyError):
    """No subject of that name in the collection."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "subject not found"


@dataclass(frozen=True)
class TemplateBatch:
    """A chunk of stored templates in id order; per-row provenance for migration/rotation."""

    ids: np.ndarray  # int64 [n]
    subjects: list[str]
    vectors: np.ndarray  # float32 [n, dim], protected templates
    scheme: list[str]
    scheme_version: list[int]
    key_id: list[str | None]
    extractor_name: list[str]
    extractor_version: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TemplateBatch(n={len(self)}, ids={int(self.ids[0]) if len(self) else None}..)"


class StoredTemplate(NamedTuple):
    subject: str
    key_id: str | None
    vector: np.ndarray  # float32 [dim], protected


@dataclass(frozen=True)
class SubjectInfo:
    name: str
    template_count: int
    created_at: datetime
    info: dict | None


@dataclass(frozen=True)
class Change:
    seq: int
    template_id: int
    op: str  # "upsert" | "delete"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _from_bytes(blob: bytes, dim: int) -> np.ndarray:
    v = np.frombuffer(blob, dtype="<f4")
    if v.size != dim:
        raise ValueError(f"stored template has {v.size} values, its row says dim={dim}")
    return v


def _chunks(seq: Sequence, n: int = _IN_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _template_count():  # type: ignore[no-untyped-def]
    """Correlated count of a subject's templates (a JSON column cannot be grouped by on PG)."""
    return (
        select(func.count(Template.id)).where(Template.subject_id == Subject.id).scalar_subquery()
    )


def make_engine(url: str) -> Engine:
    """An engine with the settings the gallery relies on (SQLite: foreign keys, WAL, fsync).

    `hide_parameters`: bound values (template vectors, API-key hashes) never appear in
    database error messages, which may reach logs and tracebacks.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged enrolment survives a crash of the process *and* the OS.
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("gallery_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


class Gallery:
    """The gallery database. Open with `Gallery.open(url)`; thread-safe (one engine, a
    connection per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._collections: dict[str, int] = {}
        self._conn: Connection | None = None  # set on the view `transaction()` yields

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, upgrade: bool = False) -> Gallery:
        """Open the database at a SQLAlchemy URL. Raises `NotMigratedError` (saying what to
        run) unless it is at the newest schema revision; `upgrade=True` migrates it first."""
        engine = make_engine(url)
        if upgrade:
            from advplugin.gallery.schema import upgrade as run_upgrade

            run_upgrade(engine)
        try:
            check_migrated(engine)
        except Exception:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        if self._conn is None:  # a transaction's view does not own the engine
            self.engine.dispose()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Gallery]:
        """ONE serialised write transaction around several gallery calls and the caller's own
        statements: yields a view of this gallery whose methods (`add_templates`, ...) all run
        in it, and whose `connection` takes the caller's SQL. Everything commits together or
        not at all. Why: a batch migration must commit a chunk's templates, their change-log
        rows and its own checkpoint atomically, or a crash could duplicate or lose a chunk.
        Inside a transaction, `transaction()` joins it."""
        if self._conn is not None:
            yield self
            return
        with self._write() as conn:
            view = copy.copy(self)
            view._conn = conn
            yield view

    @property
    def connection(self) -> Connection:
        """The connection of the current `transaction()` (for the caller's own statements)."""
        if self._conn is None:
            raise RuntimeError("Gallery.connection exists only inside `with gallery.transaction()`")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One serialised write transaction (see the module docstring for why)."""
        if self._conn is not None:
            yield self._conn
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(gallery_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if self._conn is not None:
            yield self._conn
            return
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- collections ---------------------------------------------------------------------------
    def collection_id(self, name: str = DEFAULT_COLLECTION, *, create: bool = True) -> int:
        """Id of a collection (tenant), creating it when missing and `create` is set."""
        if name in self._collections:
            return self._collections[name]
        with self._read() as conn:
            cid = conn.scalar(select(Collection.id).where(Collection.name == name))
        if cid is None:
            if not create:
                raise KeyError(f"no collection named {name!r}")
            with self._write() as conn:
                cid = conn.scalar(select(Collection.id).where(Collection.name == name))
                if cid is None:
                    cid = conn.scalar(
                        insert(Collection).values(name=name, created_at=utcnow()).returning(Collection.id)
                    )
                    if self._conn is not None:
                        return int(cid)  # not cached: the transaction may still roll back
        self._collections[name] = int(cid)
        return int(cid)

    def collections(self) -> list[str]:
        with self._read() as conn:
            return list(conn.scalars(select(Collection.name).order_by(Collection.id)))

    # -- templates -----------------------------------------------------------------------------
    def add_templates(
        self,
        subjects: Sequence[str],
        templates: np.ndarray,
        *,
        protection: ProtectorMetadata,
        extractor_name: str,
        extractor_version: str,
        collection: str = DEFAULT_COLLECTION,
        image_sha256: Sequence[str | None] | None = None,
        images: Sequence[bytes | None] | None = None,
    ) -> list[int]:
        """Store templates[i] for subjects[i] (subjects created as needed), all in ONE
        transaction; returns the new template ids in input order.

        `protection` is the protector's metadata (scheme, version, key id, output dim) and is
        written on every row, together with the extractor's name and version.
        """
        vectors = validate_embeddings(templates, protection.output_dim, what="templates")
        if len(subjects) != len(vectors):
            raise ValueError(f"{len(subjects)} subject names for {len(vectors)} templates")
        for extra, what in ((image_sha256, "image_sha256"), (images, "images")):
            if extra is not None and len(extra) != len(vectors):
                raise ValueError(f"{what} has {len(extra)} entries for {len(vectors)} templates")
        for name in subjects:
            if not isinstance(name, str) or not name.strip() or len(name) > 255:
                raise ValueError("subject names must be non-empty strings of at most 255 characters")
        if not len(vectors):
            return []
        cid = self.collection_id(collection)
        now = utcnow()
        with self._write() as conn:
            subject_ids = self._subject_ids(conn, cid, subjects, create=True)
            ids = self._next_template_ids(conn, len(vectors))
            columns = {
                "id": ids,
                "subject_id": [subject_ids[name] for name in subjects],
                "image_sha256": list(image_sha256) if image_sha256 is not None else [None] * len(ids),
                "image": list(images) if images is not None else [None] * len(ids),
            }
            shared = {
                "collection_id": cid,
                "dim": protection.output_dim,
                "scheme": protection.scheme,
                "scheme_version": protection.scheme_version,
                "key_id": protection.key_id,
                "extractor_name": extractor_name,
                "extractor_version": extractor_version,
                "created_at": now,
                "updated_at": now,
            }
            if self.dialect == "postgresql":
                conn.execute(
                    _PG_INSERT_TEMPLATES,
                    columns | shared | {"vectors": _to_bytes(vectors), "nbytes": 4 * vectors.shape[1]},
                )
            else:  # SQLite: the driver's executemany, one prepared statement
                columns["vector"] = [_to_bytes(v) for v in vectors]
                names = list(columns)
                rows = [dict(zip(names, r, strict=True)) | shared for r in zip(*columns.values(), strict=True)]
                conn.execute(insert(Template), rows)
            # One change-log statement for the chunk: the rows just inserted, read back in
            # the server. The id range holds no one else's rows (ids come from our
            # allocation, under the write lock).
            conn.execute(
                insert(TemplateChange).from_select(
                    ["collection_id", "template_id", "op", "created_at"],
                    select(
                        Template.collection_id, Template.id, literal("upsert", String),
                        literal(now, DateTime(timezone=True)),
                    )
                    .where(Template.collection_id == cid, Template.id.between(ids[0], ids[-1]))
                    .order_by(Template.id),
                )
            )
        return ids

    def _next_template_ids(self, conn: Connection, n: int) -> list[int]:
        """Allocate `n` new template ids, ascending. Allocating first and inserting with
        explicit ids lets a chunk go in as one bulk statement without RETURNING (whose
        per-row fallback on SQLite and client-side query parsing on psycopg dominated
        the insert time). Ids are still never reused: PostgreSQL takes them from the
        column's sequence; on SQLite, inside the `BEGIN IMMEDIATE` write transaction,
        they continue after both the largest id and AUTOINCREMENT's high-water mark."""
        if self.dialect == "postgresql":
            q = text(
                "SELECT nextval(pg_get_serial_sequence('templates', 'id')) "
                "FROM generate_series(1, :n)"
            )
            return sorted(int(i) for i in conn.scalars(q, {"n": n}))
        last = conn.scalar(
            text(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'templates'), 0), "
                "coalesce((SELECT max(id) FROM templates), 0))"
            )
        )
        return list(range(int(last) + 1, int(last) + 1 + n))

    def _subject_ids(
        self, conn: Connection, cid: int, names: Sequence[str], *, create: bool
    ) -> dict[str, int]:
        wanted = sorted(set(names))
        found = self._find_subjects(conn, cid, wanted)
        missing = [n for n in wanted if n not in found]
        if missing and create:
            # Bulk insert without RETURNING, then read the ids back (see _next_template_ids).
            now = utcnow()
            if self.dialect == "postgresql":
                conn.execute(_PG_INSERT_SUBJECTS, {"cid": cid, "names": missing, "now": now})
            else:
                rows = [{"collection_id": cid, "name": n, "created_at": now} for n in missing]
                conn.execute(insert(Subject), rows)
            found.update(self._find_subjects(conn, cid, missing))
        return found

    def _find_subjects(self, conn: Connection, cid: int, names: Sequence[str]) -> dict[str, int]:
        if self.dialect == "postgresql":
            return {n: int(i) for n, i in conn.execute(_PG_FIND_SUBJECTS, {"cid": cid, "names": list(names)})}
        found: dict[str, int] = {}
        for part in _chunks(names):
            q = select(Subject.name, Subject.id).where(
                Subject.collection_id == cid, Subject.name.in_(part)
            )
            found.update({n: int(i) for n, i in conn.execute(q)})
        return found

    def _log(self, conn: Connection, cid: int, ids: Sequence[int], op: str, now: datetime) -> None:
        if ids:
            conn.execute(
                insert(TemplateChange),
                [{"collection_id": cid, "template_id": i, "op": op, "created_at": now} for i in ids],
            )

    def iter_templates(
        self,
        *,
        collection: str | None = DEFAULT_COLLECTION,
        chunk_size: int = 1000,
        after_id: int = 0,
        key_id: str | None = None,
        scheme: str | None = None,
    ) -> Iterator[TemplateBatch]:
        """Templates in ascending id order, `chunk_size` at a time (keyset pagination, so it
        is safe on millions of rows and resumable from `after_id`). `collection=None` means
        all collections. All rows of one chunk must share one dimension (filter by scheme or
        key id in mixed galleries)."""
        cid = None if collection is None else self.collection_id(collection, create=False)
        last = after_id
        while True:
            q = (
                select(
                    Template.id, Subject.name, Template.vector, Template.dim, Template.scheme,
                    Template.scheme_version, Template.key_id, Template.extractor_name,
                    Template.extractor_version,
                )
                .join(Subject, Subject.id == Template.subject_id)
                .where(Template.id > last)
                .order_by(Template.id)
                .limit(chunk_size)
            )
            if cid is not None:
                q = q.where(Template.collection_id == cid)
            if key_id is not None:
                q = q.where(Template.key_id == key_id)
            if scheme is not None:
                q = q.where(Template.scheme == scheme)
            with self._read() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            dims = {r.dim for r in rows}
            if len(dims) > 1:
                raise ValueError(f"templates of several dimensions {sorted(dims)}; filter by scheme or key id")
            yield TemplateBatch(
                ids=np.array([r.id for r in rows], np.int64),
                subjects=[r.name for r in rows],
                vectors=np.stack([_from_bytes(r.vector, r.dim) for r in rows]).astype(np.float32),
                scheme=[r.scheme for r in rows],
                scheme_version=[r.scheme_version for r in rows],
                key_id=[r.key_id for r in rows],
                extractor_name=[r.extractor_name for r in rows],
                extractor_version=[r.extractor_version for r in rows],
            )
            last = int(rows[-1].id)

    def get_templates(self, ids: Sequence[int]) -> dict[int, tuple[str, np.ndarray]]:
        """{template id: (subject name, protected vector)} for the ids that still exist."""
        return {i: (r.subject, r.vector) for i, r in self.template_rows(ids).items()}

    def template_rows(self, ids: Sequence[int]) -> dict[int, StoredTemplate]:
        """{template id: (subject, key id, vector)} for the ids that still exist, read in one
        snapshot: a vector is always paired with the key id it is under (mid-rotation, a
        vector from one read and a key id from another could disagree)."""
        out: dict[int, StoredTemplate] = {}
        with self._read() as conn:
            for part in _chunks([int(i) for i in ids]):
                q = (
                    select(Template.id, Subject.name, Template.key_id, Template.vector, Template.dim)
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id.in_(part))
                )
                for r in conn.execute(q):
                    out[int(r.id)] = StoredTemplate(r.name, r.key_id, _from_bytes(r.vector, r.dim))
        return out

    def template_subjects(self, ids: Sequence[int]) -> dict[int, str]:
        """{template id: subject name}, for turning search hits into answers."""
        out: dict[int, str] = {}
        with self._read() as conn:
            for part in _chunks([int(i) for i in ids]):
                q = select(Template.id, Subject.name).join(Subject).where(Template.id.in_(part))
                out.update({int(i): n for i, n in conn.execute(q)})
        return out

    def replace_templates(
        self,
        ids: Sequence[int],
        templates: np.ndarray,
        *,
        key_id: str | None,
        scheme: str | None = None,
        scheme_version: int | None = None,
        from_key_id: str | None = None,
    ) -> int:
        """Overwrite the vectors (and key id, optionally scheme/version) of existing templates
        in ONE transaction, logging each as a change for the index; returns the row count.

        For key rotation: with `from_key_id`, every row must still carry that key id, else
        nothing changes (so a rotation interrupted and restarted never double-rotates).
        Raises KeyError if an id does not exist (nothing changes).
        """
        ids = [int(i) for i in ids]
        t = np.asarray(templates)
        if t.ndim != 2 or len(t) != len(ids):
            raise ValueError(f"need one template row per id ({len(ids)}), got shape {list(t.shape)}")
        vectors = validate_embeddings(t, t.shape[1], what="templates")
        if not ids:
            return 0
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate template ids")
        now = utcnow()
        with self._write() as conn:
            current: dict[int, tuple[int, int, str | None]] = {}
            for part in _chunks(ids):
                q = select(Template.id, Template.collection_id, Template.dim, Template.key_id).where(
                    Template.id.in_(part)
                )
                current.update({int(r.id): (r.collection_id, r.dim, r.key_id) for r in conn.execute(q)})
            missing = [i for i in ids if i not in current]
            if missing:
                raise KeyError(f"{len(missing)} template ids do not exist (first: {missing[0]})")
            if any(dim != vectors.shape[1] for _, dim, _ in current.values()):
                raise ValueError("replacement templates must keep each row's dimension")
            if from_key_id is not None and any(k != from_key_id for _, _, k in current.values()):
                raise ValueError(f"some templates are not under key {from_key_id}; nothing replaced")
            values: dict[str, object] = {
                "vector": bindparam("v"), "key_id": key_id, "updated_at": now,
            }
            if scheme is not None:
                values["scheme"] = scheme
            if scheme_version is not None:
                values["scheme_version"] = scheme_version
            stmt = update(Template).where(Template.id == bindparam("tid")).values(**values)
            conn.execute(
                stmt.execution_options(synchronize_session=False),
                [{"tid": i, "v": _to_bytes(v)} for i, v in zip(ids, vectors, strict=True)],
            )
            by_collection: dict[int, list[int]] = {}
            for i in ids:
                by_collection.setdefault(current[i][0], []).append(i)
            for cid, part in by_collection.items():
                self._log(conn, cid, part, "upsert", now)
        return len(ids)

    def delete_templates(self, ids: Sequence[int]) -> int:
        """Delete templates by id (unknown ids are ignored); returns how many were deleted."""
        ids = [int(i) for i in ids]
        now = utcnow()
        deleted = 0
        with self._write() as conn:
            for part in _chunks(ids):
                rows = conn.execute(
                    select(Template.id, Template.collection_id).where(Template.id.in_(part))
                ).all()
                conn.execute(delete(Template).where(Template.id.in_([r.id for r in rows])))
                for r in rows:
                    self._log(conn, r.collection_id, [int(r.id)], "delete", now)
                deleted += len(rows)
        return deleted

    def delete_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> int:
        """Delete a subject and every template of it; returns the number of templates.
        Raises `SubjectNotFound`."""
        cid = self.collection_id(collection)
        now = utcnow()
        with self._write() as conn:
            sid = conn.scalar(
                select(Subject.id).where(Subject.collection_id == cid, Subject.name == name)
            )
            if sid is None:
                raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
            ids = [int(i) for i in conn.scalars(select(Template.id).where(Template.subject_id == sid))]
            conn.execute(delete(Template).where(Template.subject_id == sid))
            conn.execute(delete(Subject).where(Subject.id == sid))
            self._log(conn, cid, ids, "delete", now)
        return len(ids)

    # -- counting and listing ---------------------------------------------------------------
    def count_templates(
        self,
        *,
        collection: str | None = DEFAULT_COLLECTION,
        key_id: str | None = None,
        scheme: str | None = None,
    ) -> int:
        q = select(func.count()).select_from(Template)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        if key_id is not None:
            q = q.where(Template.key_id == key_id)
        if scheme is not None:
            q = q.where(Template.scheme == scheme)
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def count_subjects(self, *, collection: str = DEFAULT_COLLECTION) -> int:
        q = select(func.count()).select_from(Subject).where(
            Subject.collection_id == self.collection_id(collection)
        )
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def provenance(self, *, collection: str | None = DEFAULT_COLLECTION) -> list[dict[str, object]]:
        """Distinct (scheme, version, key id, extractor, dim) groups with their counts: shows
        mixed galleries (half-rotated keys, two extractors) at a glance."""
        cols = (
            Template.scheme, Template.scheme_version, Template.key_id,
            Template.extractor_name, Template.extractor_version, Template.dim,
        )
        q = select(*cols, func.count()).group_by(*cols)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        with self._read() as conn:
            return [
                {
                    "scheme": r[0], "scheme_version": r[1], "key_id": r[2],
                    "extractor_name": r[3], "extractor_version": r[4], "dim": r[5], "count": r[6],
                }
                for r in conn.execute(q)
            ]

    def has_templates(self, *, key_id: str | None, collection: str | None = DEFAULT_COLLECTION) -> bool:
        """Whether any template is under `key_id` (an indexed probe, unlike counting): how a
        service notices that a key rotation has finished."""
        cond = Template.key_id.is_(None) if key_id is None else Template.key_id == key_id
        q = select(Template.id).where(cond).limit(1)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        with self._read() as conn:
            return conn.scalar(q) is not None

    def key_ids_changed(
        self, after_seq: int, upto_seq: int, *, collection: str = DEFAULT_COLLECTION
    ) -> set[str | None]:
        """Key ids of the templates touched by changes `after_seq < seq <= upto_seq`. A
        running service reads only the changes since it last looked, so it notices a key
        rotation started by another process without scanning the gallery."""
        cid = self.collection_id(collection)
        q = (
            select(Template.key_id)
            .distinct()
            .join(TemplateChange, TemplateChange.template_id == Template.id)
            .where(
                TemplateChange.collection_id == cid,
                TemplateChange.seq > after_seq,
                TemplateChange.seq <= upto_seq,
            )
        )
        with self._read() as conn:
            return set(conn.scalars(q))

    def list_subjects(
        self, *, collection: str = DEFAULT_COLLECTION, offset: int = 0, limit: int = 100
    ) -> list[SubjectInfo]:
        cid = self.collection_id(collection)
        q = (
            select(Subject.name, Subject.created_at, Subject.info, _template_count())
            .where(Subject.collection_id == cid)
            .order_by(Subject.name)
            .offset(offset)
            .limit(limit)
        )
        with self._read() as conn:
            return [SubjectInfo(r[0], int(r[3]), r[1], r[2]) for r in conn.execute(q)]

    def get_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> SubjectInfo:
        cid = self.collection_id(collection)
        q = select(Subject.name, Subject.created_at, Subject.info, _template_count()).where(
            Subject.collection_id == cid, Subject.name == name
        )
        with self._read() as conn:
            r = conn.execute(q).first()
        if r is None:
            raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
        return SubjectInfo(r[0], int(r[3]), r[1], r[2])

    def subject_template_ids(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> list[int]:
        cid = self.collection_id(collection)
        q = (
            select(Template.id)
            .join(Subject)
            .where(Subject.collection_id == cid, Subject.name == name)
            .order_by(Template.id)
        )
        with self._read() as conn:
            return [int(i) for i in conn.scalars(q)]

    # -- change log (what the FAISS index replays) ----------------------------------------------
    def last_change_seq(self, *, collection: str = DEFAULT_COLLECTION) -> int:
        cid = self.collection_id(collection)
        q = select(func.max(TemplateChange.seq)).where(TemplateChange.collection_id == cid)
        with self._read() as conn:
            return int(conn.scalar(q) or 0)

    def changes_since(
        self, seq: int, *, collection: str = DEFAULT_COLLECTION, limit: int = 10_000
    ) -> list[Change]:
        cid = self.collection_id(collection)
        q = (
            select(TemplateChange.seq, TemplateChange.template_id, TemplateChange.op)
            .where(TemplateChange.collection_id == cid, TemplateChange.seq > seq)
            .order_by(TemplateChange.seq)
            .limit(limit)
        )
        with self._read() as conn:
            return [Change(int(s), int(t), o) for s, t, o in conn.execute(q)]

    # -- API keys -------------------------------------------------------------------------------
    def create_api_key(self, name: str = "default", *, collection: str = DEFAULT_COLLECTION) -> str:
        """Create an API key for a collection; returns the key, which is stored only hashed
        (show it once, it cannot be recovered)."""
        api_key = secrets.token_urlsafe(32)
        self.create_api_key_hash(hash_api_key(api_key), name, collection=collection)
        return api_key

    def create_api_key_hash(
        self, key_sha256: str, name: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> None:
        """Register an API key chosen elsewhere (e.g. ADVPLUGIN_API_KEY) by its SHA-256."""
        cid = self.collection_id(collection)
        with self._write() as conn:
            conn.execute(
                insert(ApiKey).values(
                    collection_id=cid, name=name, key_sha256=key_sha256, created_at=utcnow()
                )
            )

    def api_key_hashes(self) -> list[tuple[str, str]]:
        """(sha256 hex, collection name) of every active API key."""
        q = (
            select(ApiKey.key_sha256, Collection.name)
            .join(Collection, Collection.id == ApiKey.collection_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        with self._read() as conn:
            return [(h, c) for h, c in conn.execute(q)]

    def revoke_api_keys(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> int:
        cid = self.collection_id(collection)
        with self._write() as conn:
            result = conn.execute(
                update(ApiKey)
                .where(ApiKey.collection_id == cid, ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return int(result.rowcount or 0)
