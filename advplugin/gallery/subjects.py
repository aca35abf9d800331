"""`Subjects`: the people of a gallery's collections, by name (`subjects`).

Why a part of its own: finding, creating and listing subjects is needed by template writes,
the sealing jobs and blind mode alike, while a subject's row also holds its sealed key (a
sealed gallery gives every subject one when it is created: `SealKeys`). Names are stored
and looked up exactly, in their canonical form (`advplugin.gallery.names`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, ScalarSelect, bindparam, delete, func, select, update

from advplugin.errors import NotFoundError
from advplugin.gallery.bulk_sql import PG_FIND_SUBJECTS, SQLITE_INSERT_SUBJECTS
from advplugin.gallery.codec import SealedSubject, chunks
from advplugin.gallery.database import DEFAULT_COLLECTION, Database, bound_value, pg_copy_rows
from advplugin.gallery.models import Subject, SubjectRename, Template, utcnow
from advplugin.gallery.names import SUBJECT_NAME_MAX, check_canonical, check_text
from advplugin.gallery.seal_state import SealKeys
from advplugin.gallery.sealing import Sealer


class SubjectNotFound(NotFoundError, KeyError):
    """No subject of that name in the collection."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "subject not found"


@dataclass(frozen=True)
class SubjectInfo:
    name: str
    template_count: int
    created_at: datetime
    info: dict | None


def stored_name(name: str, collection: str) -> str:
    """A name looked up: one that could never have been stored is absent (and PostgreSQL
    would refuse it in a query), without asking the database."""
    try:
        return check_text(name, "subject name", SUBJECT_NAME_MAX)
    except ValueError:
        raise SubjectNotFound(f"no such subject in collection {collection!r}") from None


def _template_count() -> ScalarSelect[int]:
    """Correlated count of a subject's templates (a JSON column cannot be grouped by on PG)."""
    return (
        select(func.count(Template.id)).where(Template.subject_id == Subject.id).scalar_subquery()
    )


class Subjects:
    """Subjects of one gallery handle: lookups, creation (with their sealed keys), reads."""

    def __init__(self, db: Database, seal: SealKeys) -> None:
        self.db = db
        self.seal = seal

    def ids_for(
        self, conn: Connection, cid: int, names: Sequence[str], *, create: bool, sealer: Sealer | None = None
    ) -> dict[str, SealedSubject]:
        """{name: (subject id, sealed subject key)}, creating missing subjects when `create`.
        With a sealer every subject has a key: new ones get theirs on insert, ones made
        before the gallery was sealed get one now."""
        wanted = sorted(set(names))
        found = self.find(conn, cid, wanted)
        missing = [n for n in wanted if n not in found]
        if missing and create:
            # Explicit ids (see `Database.next_ids`): one bulk insert, nothing read back.
            now = utcnow()
            made = dict(zip(missing, sealer.new_subject_keys(cid, missing), strict=True)) if sealer else {}
            keys = [made[n][0] if sealer else None for n in missing]
            sids = self.db.next_ids(conn, "subjects", len(missing))
            if self.db.dialect == "postgresql":
                pg_copy_rows(
                    conn, "subjects",
                    [("id", "int8"), ("collection_id", "int4"), ("name", "varchar"), ("sealed_key", "bytea"),
                     ("created_at", "timestamptz")],
                    ((i, cid, n, k, now) for i, n, k in zip(sids, missing, keys, strict=True)),
                )
            else:  # one statement, as the templates (see _SQLITE_INSERT_TEMPLATES)
                width = len(keys[0]) if keys[0] is not None else 0  # one sealer: one key length
                conn.exec_driver_sql(SQLITE_INSERT_SUBJECTS, {
                    "first": sids[0], "cid": cid, "names": json.dumps(missing), "width": width,
                    "keys": b"".join(keys) if width else b"",  # type: ignore[arg-type]
                    "created_at": bound_value(Subject.__table__.c.created_at, conn.dialect, now),
                })
            found.update({
                n: SealedSubject(i, k, made[n][1] if sealer else None)
                for i, n, k in zip(sids, missing, keys, strict=True)
            })
        if sealer is not None:
            unkeyed = [n for n, s in found.items() if s.key is None]
            keyless = dict(zip(unkeyed, sealer.new_subject_keys(cid, unkeyed), strict=True))
            if keyless:
                conn.execute(
                    update(Subject).where(Subject.id == bindparam("sid")).values(sealed_key=bindparam("k")),
                    [{"sid": found[n].id, "k": k} for n, (k, _) in keyless.items()],
                )
                found.update({n: SealedSubject(found[n].id, k, c) for n, (k, c) in keyless.items()})
        return found

    def find(self, conn: Connection, cid: int, names: Sequence[str]) -> dict[str, SealedSubject]:
        if self.db.dialect == "postgresql":
            rows = conn.execute(PG_FIND_SUBJECTS, {"cid": cid, "names": json.dumps(list(names))})
            return {n: SealedSubject(int(i), k) for n, i, k in rows}
        found: dict[str, SealedSubject] = {}
        for part in chunks(names):
            # The driver's own query (a bulk write looks up thousands of names per chunk).
            q = f"SELECT name, id, sealed_key FROM subjects WHERE collection_id = ? AND name IN ({', '.join('?' * len(part))})"  # noqa: S608 - placeholders only
            found.update({n: SealedSubject(int(i), k) for n, i, k in conn.exec_driver_sql(q, (cid, *part))})
        return found

    def add_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> bool:
        """Create a subject without templates (CompreFace's "add a subject"); False when it
        exists. No change-log row: an index holds templates, and this adds none."""
        check_canonical(name)
        cid = self.db.collection_id(collection)
        with self.db.write() as conn:
            if self.find(conn, cid, [name]):
                return False
            self.ids_for(conn, cid, [name], create=True, sealer=self.seal.write_sealer(conn))
        return True

    def count_subjects(self, *, collection: str = DEFAULT_COLLECTION) -> int:
        q = select(func.count()).select_from(Subject).where(
            Subject.collection_id == self.db.collection_id(collection)
        )
        with self.db.read() as conn:
            return int(conn.scalar(q) or 0)

    def list_subjects(
        self, *, collection: str = DEFAULT_COLLECTION, offset: int = 0, limit: int = 100
    ) -> list[SubjectInfo]:
        cid = self.db.collection_id(collection)
        q = (
            select(Subject.name, Subject.created_at, Subject.info, _template_count())
            .where(Subject.collection_id == cid)
            .order_by(Subject.name)
            .offset(offset)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [SubjectInfo(r[0], int(r[3]), r[1], r[2]) for r in conn.execute(q)]

    def subject_renames(self) -> list[Any]:
        """The renames to canonical names the upgrade to revision 0011 planned, not yet done,
        in subject id order: rows with `SubjectRename`'s columns."""
        t = SubjectRename.__table__
        with self.db.read() as conn:
            return list(conn.execute(select(t).order_by(t.c.subject_id)).all())

    def forget_subject_rename(self, subject_id: int) -> None:
        with self.db.write() as conn:
            conn.execute(delete(SubjectRename).where(SubjectRename.subject_id == subject_id))

    def get_subject(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> SubjectInfo:
        name = stored_name(name, collection)
        cid = self.db.collection_id(collection)
        q = select(Subject.name, Subject.created_at, Subject.info, _template_count()).where(
            Subject.collection_id == cid, Subject.name == name
        )
        with self.db.read() as conn:
            r = conn.execute(q).first()
        if r is None:
            raise SubjectNotFound(f"no subject {name!r} in collection {collection!r}")
        return SubjectInfo(r[0], int(r[3]), r[1], r[2])

    def subject_template_ids(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> list[int]:
        name = stored_name(name, collection)
        cid = self.db.collection_id(collection)
        q = (
            select(Template.id)
            .join(Subject)
            .where(Subject.collection_id == cid, Subject.name == name)
            .order_by(Template.id)
        )
        with self.db.read() as conn:
            return [int(i) for i in conn.scalars(q)]
