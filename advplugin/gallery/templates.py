"""`TemplateRepository`: protected templates and their subjects, with per-row provenance.

Why a room of its own: this is where the per-dialect bulk SQL lives (one-statement inserts
on PostgreSQL, one `executemany` on SQLite) and the rules that keep the FAISS index right:

* every change of a template writes its `template_changes` entry in the same transaction
  (`ChangeLog._log*`), so the index, a cache, can always catch up by replaying the log;
* template ids are never reused (PostgreSQL: the column's sequence; SQLite: AUTOINCREMENT
  and, for the ids this module allocates itself, its high-water mark under the serialised
  write lock), so a FAISS id can never silently come to mean another template;
* every row records how it was made (scheme, version, `config_digest`, key id, extractor),
  so a gallery can be migrated or re-keyed row by row and mixed galleries are detected.

Vectors are stored as float32 bytes of *protected* templates; this module refuses arrays
that are not float32-compatible [N, dim] and never logs or echoes vector values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import numpy as np
from sqlalchemy import (
    Connection,
    ScalarSelect,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)

from advplugin.gallery.changelog import ChangeLog
from advplugin.gallery.database import DEFAULT_COLLECTION
from advplugin.gallery.models import Subject, Template, utcnow
from advplugin.protectors.base import ProtectorMetadata, validate_embeddings

_IN_CHUNK = 500  # ids per IN (...) clause, well under every driver's parameter limit
_DIGEST = re.compile(r"[0-9a-f]{16}")

# PostgreSQL bulk insert of one chunk in one statement: the vectors travel as ONE bytea
# parameter (binary, no escaping) cut into rows by the server, the other per-row values as
# arrays, per-chunk values once. No per-row SQL text is built or parsed on either side.
_PG_INSERT_TEMPLATES = text(
    """
    INSERT INTO templates (id, subject_id, collection_id, vector, dim, scheme, scheme_version,
        config_digest, key_id, extractor_name, extractor_version, image_sha256, image,
        created_at, updated_at)
    SELECT u.id, u.subject_id, :collection_id,
        substring(CAST(:vectors AS BYTEA) FROM CAST((u.n - 1) * :nbytes + 1 AS INTEGER)
                  FOR CAST(:nbytes AS INTEGER)),
        :dim, :scheme, :scheme_version, :config_digest, :key_id, :extractor_name,
        :extractor_version, u.image_sha256, u.image, :created_at, :updated_at
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
    config_digest: list[str]  # the scheme's options + weights (ProtectorMetadata.config_digest)

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


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"config_digest must be 16 lowercase hex digits, got {digest!r}")
    return digest


def _template_count() -> ScalarSelect[int]:
    """Correlated count of a subject's templates (a JSON column cannot be grouped by on PG)."""
    return (
        select(func.count(Template.id)).where(Template.subject_id == Subject.id).scalar_subquery()
    )


class TemplateRepository(ChangeLog):
    """Templates and subjects: writes (each logged in its own transaction through the
    `ChangeLog` it extends), reads by id and in id order, counts and provenance."""

    # -- writing ---------------------------------------------------------------------------
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

        `protection` is the protector's metadata (scheme, version, config digest, key id,
        output dim) and is written on every row, together with the extractor's name and
        version.
        """
        vectors = validate_embeddings(templates, protection.output_dim, what="templates")
        digest = _check_digest(protection.config_digest)
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
                "config_digest": digest,
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
            # One change-log statement for the chunk. The id range holds no one else's rows
            # (ids come from our allocation, under the write lock).
            self._log_inserted(conn, cid, ids[0], ids[-1], now)
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

    def replace_templates(
        self,
        ids: Sequence[int],
        templates: np.ndarray,
        *,
        key_id: str | None,
        scheme: str | None = None,
        scheme_version: int | None = None,
        config_digest: str | None = None,
        from_key_id: str | None = None,
    ) -> int:
        """Overwrite the vectors (and key id, optionally scheme/version/config digest) of
        existing templates in ONE transaction, logging each as a change for the index;
        returns the row count. A row keeps its scheme, version and config digest unless new
        ones are given (a key rotation changes the key only).

        For key rotation: with `from_key_id`, every row must still carry that key id, else
        nothing changes (so a rotation interrupted and restarted never double-rotates).
        Raises KeyError if an id does not exist (nothing changes).
        """
        ids = [int(i) for i in ids]
        t = np.asarray(templates)
        if t.ndim != 2 or len(t) != len(ids):
            raise ValueError(f"need one template row per id ({len(ids)}), got shape {list(t.shape)}")
        vectors = validate_embeddings(t, t.shape[1], what="templates")
        if config_digest is not None:
            _check_digest(config_digest)
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
            if config_digest is not None:
                values["config_digest"] = config_digest
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

    # -- reading -----------------------------------------------------------------------------
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
                    Template.extractor_version, Template.config_digest,
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
                config_digest=[r.config_digest for r in rows],
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
        """Distinct (scheme, version, config digest, key id, extractor, dim) groups with their
        counts: shows mixed galleries (half-rotated keys, two extractors, two configurations
        of one scheme) at a glance."""
        cols = (
            Template.scheme, Template.scheme_version, Template.config_digest, Template.key_id,
            Template.extractor_name, Template.extractor_version, Template.dim,
        )
        q = select(*cols, func.count()).group_by(*cols)
        if collection is not None:
            q = q.where(Template.collection_id == self.collection_id(collection))
        with self._read() as conn:
            return [
                {
                    "scheme": r[0], "scheme_version": r[1], "config_digest": r[2], "key_id": r[3],
                    "extractor_name": r[4], "extractor_version": r[5], "dim": r[6], "count": r[7],
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
