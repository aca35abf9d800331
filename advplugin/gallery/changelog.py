"""`ChangeLog`: the `template_changes` outbox that the FAISS index replays.

Why a part of its own: the index (a cache of `templates`) depends on this contract and on
nothing else of the write side. Every change of a template (insert, vector or key update,
delete) writes its change row in the caller's transaction (`log*` take the caller's
connection), so the change and its log entry commit together or not at all: an index that
replays every entry after the `seq` of its snapshot can never miss an enrolment or
resurrect a deleted template, whatever crashed in between. Because gallery writes are
serialised (`advplugin.gallery.database`), sequence numbers commit in order: a reader that
has seen change `n` has seen every change before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, DateTime, Engine, String, func, insert, literal, select

from advplugin.gallery.database import (
    DEFAULT_COLLECTION,
    Database,
    pg_copy,
    pg_int4,
    pg_text,
    pg_timestamptz,
)
from advplugin.gallery.models import Template, TemplateChange


@dataclass(frozen=True)
class Change:
    seq: int
    template_id: int
    op: str  # "upsert" | "delete"


#: Blocks of more ids than this are logged by COPY on PostgreSQL.
_COPY_FROM = 100


class ChangeWatch:
    """The newest change `seq` of the whole gallery (every collection), read again and again
    on one held driver connection with one fixed statement (the primary key's max: one index
    probe). An index follower asks this dozens of times a second; through a pooled
    connection and SQLAlchemy's statement handling that was ~1 ms per look and 3-4 % of a
    core while idle, here it is the query alone, and one look serves every collection (a
    changed number says *something* changed; each index then reads its own changes). Each
    look is its own read (the transaction is ended at once), so it never pins an old
    snapshot (SQLite WAL) or holds a transaction open (PostgreSQL). A failed look drops the
    connection; the next one opens a new one. One thread at a time."""

    _SQL = "SELECT max(seq) FROM template_changes"

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Any = None

    def latest(self) -> int:
        if self._conn is None:
            self._conn = self._engine.raw_connection()
        try:
            cur = self._conn.cursor()
            try:
                cur.execute(self._SQL)
                row = cur.fetchone()
            finally:
                cur.close()
            self._conn.rollback()
        except Exception:
            self.close()
            raise
        return int(row[0] or 0) if row else 0

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is simply dropped
                conn.close()


class ChangeLog:
    """Reading the change log (what the index follower needs), and writing entries inside
    the transaction of the change they describe (what the templates part does)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writing, in the caller's transaction ------------------------------------------------
    def log(self, conn: Connection, cid: int, ids: Sequence[int], op: str, now: datetime) -> None:
        """One `op` entry per template id, in order, on the caller's connection."""
        if ids:
            conn.execute(
                insert(TemplateChange),
                [{"collection_id": cid, "template_id": i, "op": op, "created_at": now} for i in ids],
            )

    def log_inserted(self, conn: Connection, cid: int, first_id: int, last_id: int, now: datetime) -> None:
        """`upsert` entries for every template of collection `cid` with an id in
        [first_id, last_id], in id order: ONE statement for a bulk insert. Only for a range
        that is exactly the rows the caller has just inserted (ids it allocated itself, one
        contiguous block under the write lock: `Database.next_ids`); SQLite reads
        them back in the server, PostgreSQL writes the range by COPY."""
        if conn.dialect.name == "postgresql" and last_id - first_id > _COPY_FROM:
            # A bulk insert's block: the entries as one binary COPY of the id range (cheaper
            # than reading the new rows back), still one entry per template, in id order.
            pg_copy(conn, "template_changes", [
                ("collection_id", pg_int4(cid)),
                ("template_id", np.arange(first_id, last_id + 1, dtype=np.int64)),
                ("op", pg_text("upsert")),
                ("created_at", pg_timestamptz(now)),
            ])
            return
        conn.execute(
            insert(TemplateChange).from_select(
                ["collection_id", "template_id", "op", "created_at"],
                select(
                    Template.collection_id, Template.id, literal("upsert", String),
                    literal(now, DateTime(timezone=True)),
                )
                .where(Template.collection_id == cid, Template.id.between(first_id, last_id))
                .order_by(Template.id),
            )
        )

    # -- reading (what the FAISS index replays) ----------------------------------------------
    def last_change_seq(self, *, collection: str = DEFAULT_COLLECTION) -> int:
        cid = self.db.collection_id(collection)
        q = select(func.max(TemplateChange.seq)).where(TemplateChange.collection_id == cid)
        with self.db.read() as conn:
            return int(conn.scalar(q) or 0)

    def change_stamp(self, seq: int, *, collection: str = DEFAULT_COLLECTION) -> str | None:
        """What change `seq` was (template, operation, time), or None where there is none: an
        index snapshot records it beside its last change number, so that a gallery restored
        from a backup, whose numbers went back and were given again to other changes, is
        not mistaken for the one the snapshot was made from."""
        cid = self.db.collection_id(collection)
        q = select(TemplateChange.template_id, TemplateChange.op, TemplateChange.created_at).where(
            TemplateChange.seq == seq, TemplateChange.collection_id == cid
        )
        with self.db.read() as conn:
            row = conn.execute(q).first()
        return None if row is None else f"{row.template_id}:{row.op}:{row.created_at.isoformat()}"

    def watch_changes(self) -> ChangeWatch:
        """A cheap, repeated look at the newest change of any collection (`ChangeWatch`)."""
        return ChangeWatch(self.db.engine)

    def changes_since(
        self, seq: int, *, collection: str = DEFAULT_COLLECTION, limit: int = 10_000
    ) -> list[Change]:
        cid = self.db.collection_id(collection)
        q = (
            select(TemplateChange.seq, TemplateChange.template_id, TemplateChange.op)
            .where(TemplateChange.collection_id == cid, TemplateChange.seq > seq)
            .order_by(TemplateChange.seq)
            .limit(limit)
        )
        with self.db.read() as conn:
            return [Change(int(s), int(t), o) for s, t, o in conn.execute(q)]

    def key_ids_changed(
        self, after_seq: int, upto_seq: int, *, collection: str = DEFAULT_COLLECTION
    ) -> set[str | None]:
        """Key ids of the templates touched by changes `after_seq < seq <= upto_seq`. A
        running service reads only the changes since it last looked, so it notices a key
        rotation started by another process without scanning the gallery."""
        cid = self.db.collection_id(collection)
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
        with self.db.read() as conn:
            return set(conn.scalars(q))
