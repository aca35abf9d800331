"""`Templates`: protected templates, with per-row provenance.

Why a part of its own: this is where the per-dialect bulk SQL lives (one-statement inserts
on PostgreSQL, one `executemany` on SQLite) and the rules that keep the FAISS index right:

* every change of a template writes its `template_changes` entry in the same transaction
  (`ChangeLog.log*`), so the index, a cache, can always catch up by replaying the log;
* template ids are never reused (`Database.next_ids`), so a FAISS id can never silently
  come to mean another template;
* every row records how it was made (scheme, version, `config_digest`, key id, extractor),
  so a gallery can be migrated or re-keyed row by row and mixed galleries are detected.

Every vector goes through the `VectorCodec`, so whatever reads templates works on sealed and
unsealed galleries alike. Arrays that are not float32-compatible [N, dim] are refused; vector
values are never logged or echoed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, bindparam, delete, func, select, update

from advplugin.gallery.bulk_sql import PG_INSERT_TEMPLATES, SQLITE_INSERT_TEMPLATES
from advplugin.gallery.changelog import ChangeLog
from advplugin.gallery.codec import VectorCodec, chunks, to_bytes
from advplugin.gallery.database import (
    DEFAULT_COLLECTION,
    Database,
    bound_value,
    pg_copy,
    pg_int4,
    pg_text,
    pg_timestamptz,
)
from advplugin.gallery.models import Subject, Template, utcnow
from advplugin.gallery.names import (
    EXTRACTOR_NAME_MAX,
    EXTRACTOR_VERSION_MAX,
    check_canonical,
    check_digest,
    check_text,
)
from advplugin.gallery.outbox import ErasureOutbox
from advplugin.gallery.seal_state import SealKeys
from advplugin.gallery.sealing import Sealer
from advplugin.gallery.subjects import SubjectNotFound, Subjects, stored_name
from advplugin.protectors.base import ProtectorMetadata, validate_embeddings


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


class Templates:
    """Templates of one gallery handle: writes (each logged in its own transaction through
    the change log), deletes (a subject's with its erasure outbox row), reads by id and in
    id order, counts and provenance; vectors through the codec."""

    def __init__(
        self, db: Database, seal: SealKeys, codec: VectorCodec, changes: ChangeLog,
        subjects: Subjects, outbox: ErasureOutbox,
    ) -> None:
        self.db, self.seal, self.codec = db, seal, codec
        self.changes, self.subjects, self.outbox = changes, subjects, outbox

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
        digest = check_digest(protection.config_digest)
        if len(subjects) != len(vectors):
            raise ValueError(f"{len(subjects)} subject names for {len(vectors)} templates")
        for extra, what in ((image_sha256, "image_sha256"), (images, "images")):
            if extra is not None and len(extra) != len(vectors):
                raise ValueError(f"{what} has {len(extra)} entries for {len(vectors)} templates")
        for name in set(subjects):
            check_canonical(name)
        check_text(extractor_name, "extractor_name", EXTRACTOR_NAME_MAX)
        check_text(extractor_version, "extractor_version", EXTRACTOR_VERSION_MAX)
        if not len(vectors):
            return []
        cid = self.db.collection_id(collection)
        now = utcnow()
        with self.db.write() as conn:
            sealer = self.seal.write_sealer(conn)
            found = self.subjects.ids_for(conn, cid, subjects, create=True, sealer=sealer)
            ids = self.db.next_ids(conn, "templates", len(vectors))
            n = len(ids)
            stored = self.codec.encode_rows(
                sealer, cid, ids, [(name, found[name]) for name in subjects], vectors,
                scheme=[protection.scheme] * n, scheme_version=[protection.scheme_version] * n,
                config_digest=[digest] * n, key_id=[protection.key_id] * n,
            )
            columns = {
                "id": ids,
                "subject_id": [found[name].id for name in subjects],
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
            if self.db.dialect == "postgresql" and image_sha256 is None and images is None:
                # Sealed or not, every row of the chunk has the same length: one binary COPY
                # whose rows numpy lays out (a bulk migration's path; no per-row Python).
                pg_copy(conn, "templates", [
                    ("id", np.asarray(ids, np.int64)),
                    ("subject_id", np.asarray(columns["subject_id"], np.int64)),
                    ("vector", stored),
                    ("collection_id", pg_int4(cid)),
                    ("dim", pg_int4(protection.output_dim)),
                    ("scheme", pg_text(protection.scheme)),
                    ("scheme_version", pg_int4(protection.scheme_version)),
                    ("config_digest", pg_text(digest)),
                    ("key_id", pg_text(protection.key_id)),
                    ("extractor_name", pg_text(extractor_name)),
                    ("extractor_version", pg_text(extractor_version)),
                    ("created_at", pg_timestamptz(now)),
                    ("updated_at", pg_timestamptz(now)),
                ])
            elif self.db.dialect == "postgresql":
                # Sealed or not, every row of the chunk has the same length: one bytea still.
                conn.execute(
                    PG_INSERT_TEMPLATES,
                    columns | shared | {"vectors": stored.tobytes(), "nbytes": stored.shape[1]},
                )
            elif image_sha256 is None and images is None:
                # SQLite, a bulk write's path: ONE statement, the vectors as one blob cut by
                # SQLite and the subject ids as one JSON array; chunk-wide values bound once
                # (no per-row Python tuple, no per-row binding of a dozen parameters).
                table = Template.__table__
                params = {n: bound_value(table.c[n], conn.dialect, v) for n, v in shared.items()}
                conn.exec_driver_sql(SQLITE_INSERT_TEMPLATES, params | {
                    "first": ids[0], "subject_ids": json.dumps(columns["subject_id"]),
                    "vectors": stored.tobytes(), "nbytes": stored.shape[1],
                })
            else:  # SQLite: the driver's executemany, one prepared statement
                # Plain tuples straight to sqlite3: SQLAlchemy's per-row parameter handling
                # (a dict per row, each DateTime formatted again) cost more than the insert.
                # The chunk-wide values go through their column types' bind processors
                # once, so what is stored is exactly what `insert(Template)` would store.
                columns["vector"] = [r.tobytes() for r in stored]
                table = Template.__table__
                names = [*columns, *shared]
                sql = f"INSERT INTO templates ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 - fixed column names
                tail = tuple(bound_value(table.c[n], conn.dialect, v) for n, v in shared.items())
                conn.exec_driver_sql(sql, [r + tail for r in zip(*columns.values(), strict=True)])
            # One change-log statement for the chunk. The id range holds no one else's rows
            # (ids come from our allocation, under the write lock).
            self.changes.log_inserted(conn, cid, ids[0], ids[-1], now)
        return ids

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
            check_digest(config_digest)
        if not ids:
            return 0
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate template ids")
        now = utcnow()
        with self.db.write() as conn:
            sealer = self.seal.write_sealer(conn)
            current: dict[int, Any] = {}
            for part in chunks(ids):
                q = (
                    select(
                        Template.id, Template.collection_id, Template.dim, Template.key_id,
                        Template.scheme, Template.scheme_version, Template.config_digest, Subject.name,
                    )
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id.in_(part))
                )
                current.update({int(r.id): r for r in conn.execute(q)})
            missing = [i for i in ids if i not in current]
            if missing:
                raise KeyError(f"{len(missing)} template ids do not exist (first: {missing[0]})")
            if any(r.dim != vectors.shape[1] for r in current.values()):
                raise ValueError("replacement templates must keep each row's dimension")
            if from_key_id is not None and any(r.key_id != from_key_id for r in current.values()):
                raise ValueError(f"some templates are not under key {from_key_id}; nothing replaced")
            stored = self._encode_replacements(
                conn, sealer, ids, current, vectors, key_id=key_id, scheme=scheme,
                scheme_version=scheme_version, config_digest=config_digest,
            )
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
                [{"tid": i, "v": v} for i, v in zip(ids, stored, strict=True)],
            )
            by_collection: dict[int, list[int]] = {}
            for i in ids:
                by_collection.setdefault(current[i].collection_id, []).append(i)
            for cid, part in by_collection.items():
                self.changes.log(conn, cid, part, "upsert", now)
        return len(ids)

    def _encode_replacements(
        self, conn: Connection, sealer: Sealer | None, ids: list[int], current: dict[int, Any],
        vectors: np.ndarray, *, key_id: str | None, scheme: str | None, scheme_version: int | None,
        config_digest: str | None,
    ) -> list[bytes]:
        """Stored bytes of replacement vectors, sealed under each row's NEW provenance."""
        if sealer is None:
            return [to_bytes(v) for v in vectors]
        out: list[bytes] = [b""] * len(ids)
        by_collection: dict[int, list[int]] = {}
        for pos, i in enumerate(ids):
            by_collection.setdefault(current[i].collection_id, []).append(pos)
        for cid, positions in by_collection.items():
            rows = [current[ids[p]] for p in positions]
            keys = self.subjects.ids_for(conn, cid, [r.name for r in rows], create=False, sealer=sealer)
            sealed = self.codec.encode(
                sealer, cid, [ids[p] for p in positions], [(r.name, keys[r.name]) for r in rows],
                vectors[positions],
                scheme=[scheme if scheme is not None else r.scheme for r in rows],
                scheme_version=[scheme_version if scheme_version is not None else r.scheme_version for r in rows],
                config_digest=[config_digest if config_digest is not None else r.config_digest for r in rows],
                key_id=[key_id] * len(rows),
            )
            for p, b in zip(positions, sealed, strict=True):
                out[p] = b
        return out

    def delete_templates(self, ids: Sequence[int]) -> int:
        """Delete templates by id (unknown ids are ignored); returns how many were deleted."""
        ids = [int(i) for i in ids]
        now = utcnow()
        deleted = 0
        with self.db.write() as conn:
            for part in chunks(ids):
                rows = conn.execute(
                    select(Template.id, Template.collection_id).where(Template.id.in_(part))
                ).all()
                conn.execute(delete(Template).where(Template.id.in_([r.id for r in rows])))
                for r in rows:
                    self.changes.log(conn, r.collection_id, [int(r.id)], "delete", now)
                deleted += len(rows)
        return deleted

    def delete_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> int:
        """Delete a subject and every template of it; returns the number of templates.
        Raises `SubjectNotFound`."""
        name = stored_name(name, collection)
        cid = self.db.collection_id(collection)
        now = utcnow()
        with self.db.write() as conn:
            row = conn.execute(
                select(Subject.id, Subject.sealed_key).where(Subject.collection_id == cid, Subject.name == name)
            ).one_or_none()
            if row is None:
                raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
            ids = self.delete_subject_rows(conn, cid, row.id, now)
            if row.sealed_key is not None:
                # Its erasure key (outside the database) goes after the commit: see PendingErasure.
                self.outbox.record(conn, cid, name, row.sealed_key, now)
        if not self.db.in_transaction:  # in a transaction its owner completes after the commit
            self.outbox.complete_erasures_or_warn()
        return len(ids)

    def delete_subject_rows(self, conn: Connection, cid: int, sid: int, now: datetime) -> list[int]:
        """Delete one subject and its templates in `conn`, logged for the index."""
        ids = [int(i) for i in conn.scalars(select(Template.id).where(Template.subject_id == sid))]
        conn.execute(delete(Template).where(Template.subject_id == sid))
        conn.execute(delete(Subject).where(Subject.id == sid))
        self.changes.log(conn, cid, ids, "delete", now)
        return ids

    def purge_erased(self, *, chunk_size: int = 10_000) -> list[tuple[int, str]]:
        """Delete the subjects whose erasure keys are gone from the store: what a gallery
        restored from a backup holds of people deleted since (unreadable, but still rows).
        Returns their (collection id, name)."""
        gone = self.outbox.erased_subjects(chunk_size=chunk_size)
        now = utcnow()
        with self.db.write() as conn:
            for r in gone:
                self.delete_subject_rows(conn, int(r.collection_id), int(r.id), now)
        return [(int(r.collection_id), r.name) for r in gone]

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
        cid = None if collection is None else self.db.collection_id(collection, create=False)
        last = after_id
        while True:
            q = (
                select(*self.codec.vector_columns(), Template.extractor_name, Template.extractor_version)
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
            with self.db.read() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            dims = {r.dim for r in rows}
            if len(dims) > 1:
                raise ValueError(f"templates of several dimensions {sorted(dims)}; filter by scheme or key id")
            yield TemplateBatch(
                ids=np.array([r.id for r in rows], np.int64),
                subjects=[r.name for r in rows],
                vectors=np.stack(self.codec.decode(rows)).astype(np.float32),
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
        with self.db.read() as conn:
            for part in chunks([int(i) for i in ids]):
                q = (
                    select(*self.codec.vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id.in_(part))
                )
                rows = conn.execute(q).all()
                for r, v in zip(rows, self.codec.decode(rows), strict=True):
                    out[int(r.id)] = StoredTemplate(r.name, r.key_id, v)
        return out

    def template_subjects(self, ids: Sequence[int]) -> dict[int, str]:
        """{template id: subject name}, for turning search hits into answers."""
        out: dict[int, str] = {}
        with self.db.read() as conn:
            for part in chunks([int(i) for i in ids]):
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
            q = q.where(Template.collection_id == self.db.collection_id(collection))
        if key_id is not None:
            q = q.where(Template.key_id == key_id)
        if scheme is not None:
            q = q.where(Template.scheme == scheme)
        with self.db.read() as conn:
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
            q = q.where(Template.collection_id == self.db.collection_id(collection))
        with self.db.read() as conn:
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
            q = q.where(Template.collection_id == self.db.collection_id(collection))
        with self.db.read() as conn:
            return conn.scalar(q) is not None

    def is_empty(self) -> bool:
        """No template in any collection (an indexed probe: a count scans every row)."""
        with self.db.read() as conn:
            return conn.scalar(select(Template.id).limit(1)) is None
