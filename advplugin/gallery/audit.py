"""`AuditLog`: the `audit_events` trail (who changed what, when), and `Actor` (the who).

Why a part of its own: the trail is written from two other parts (enrolments and deletions
by the service, API-key operations by the CLI) and read by an admin, and it must commit in
the transaction of the change it records: `record_audit` runs in the caller's connection
(inside `Gallery.transaction()`, the change's own), so a crash can leave neither a change
without its event nor an event for a change that never happened. It stores ids, names,
actions and counts only: never vectors, images or keys (API keys appear by their row id).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, insert, select

from advplugin.gallery.database import Database
from advplugin.gallery.models import AuditEvent, Collection, utcnow

#: Actions written by advplugin itself (the column accepts any short word, for later ones).
AUDIT_ACTIONS = (
    "enroll", "delete_subject", "add_subject", "delete_templates", "create_api_key", "revoke_api_key", "rotate_key",
    "set_api_key", "budget_exceeded", "operating_point",
)


@dataclass(frozen=True)
class Actor:
    """Who made a change: an API key (by its row id, never the key) or a named tool."""

    actor: str = "cli"
    api_key_id: int | None = None

    @classmethod
    def api_key(cls, api_key_id: int) -> Actor:
        return cls(actor="api-key", api_key_id=api_key_id)


#: Changes made from the command line (`advplugin db ...`): no API key involved.
CLI = Actor("cli")


@dataclass(frozen=True)
class AuditRecord:
    id: int
    created_at: datetime
    collection: str
    actor: str
    api_key_id: int | None
    action: str
    subject: str | None
    template_count: int | None


class AuditLog:
    """The audit trail of one gallery handle (in a transaction's: written in it)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_audit(
        self,
        actor: Actor,
        action: str,
        *,
        collection: str,
        subject: str | None = None,
        template_count: int | None = None,
    ) -> None:
        """Append one event, in the current `transaction()` when there is one (call it there:
        that is what makes the event and the change commit together)."""
        cid = self.db.collection_id(collection)
        with self.db.write() as conn:
            conn.execute(
                insert(AuditEvent).values(
                    created_at=utcnow(), collection_id=cid, api_key_id=actor.api_key_id,
                    actor=actor.actor, action=action, subject=subject, template_count=template_count,
                )
            )

    def audit_events(
        self, *, collection: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[AuditRecord]:
        """Events, oldest first; of one collection, or of all when `collection` is None."""
        e = AuditEvent
        q = (
            select(e.id, e.created_at, e.collection_id, e.actor, e.api_key_id, e.action, e.subject,
                   e.template_count, Collection.name.label("collection_name"))
            .join(Collection, Collection.id == e.collection_id, isouter=True)
            .order_by(e.id).offset(offset).limit(limit)
        )
        if collection is not None:
            q = q.where(e.collection_id == self.db.collection_id(collection, create=False))
        with self.db.read() as conn:
            rows = conn.execute(q).all()
        return [
            AuditRecord(
                id=int(r.id), created_at=as_utc(r.created_at),
                collection=r.collection_name or str(r.collection_id), actor=r.actor,
                api_key_id=r.api_key_id, action=r.action, subject=r.subject,
                template_count=r.template_count,
            )
            for r in rows
        ]

    def count_audit_events(self, *, collection: str | None = None) -> int:
        q = select(func.count()).select_from(AuditEvent)
        if collection is not None:
            q = q.where(AuditEvent.collection_id == self.db.collection_id(collection, create=False))
        with self.db.read() as conn:
            return int(conn.scalar(q) or 0)


def as_utc(value: datetime) -> datetime:
    """SQLite returns the stored UTC time without its zone: say it is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
