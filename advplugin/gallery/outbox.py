"""`ErasureOutbox`: deleted subjects whose erasure keys are still to be shredded
(`pending_erasures`).

Why a part of its own: the erasure key store is another database, so shredding a deleted
subject's erasure key cannot commit with the delete. The delete writes an outbox row in its
own transaction (`record`); the key is shredded after the commit (`complete_erasures`), and
whatever a crash left pending is shredded at the next delete or start-up
(docs/sealed-storage.md, "Erasure").
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from advplugin.gallery.database import Database
from advplugin.gallery.models import PendingErasure, Subject
from advplugin.gallery.seal_state import SealKeys
from advplugin.gallery.sealing import ERASABLE_SUBJECT_KEY_BYTES, TamperedError

log = logging.getLogger(__name__)


class ErasureOutbox:
    """The erasure outbox of one gallery handle."""

    def __init__(self, db: Database, seal: SealKeys) -> None:
        self.db = db
        self.seal = seal

    def record(self, conn: Connection, cid: int, name: str, sealed_key: bytes, now: datetime) -> None:
        """A deleted subject's erasure key to shred after the delete commits (in its `conn`)."""
        conn.execute(insert(PendingErasure).values(collection_id=cid, name=name, sealed_key=sealed_key, created_at=now))

    def complete_erasures_or_warn(self) -> None:
        """`complete_erasures` after a delete that has committed: a store that fails now
        leaves the outbox for the next delete or start-up, and says so in the log."""
        try:
            self.complete_erasures()
        except (SQLAlchemyError, OSError) as e:
            log.warning("erasure keys of deleted subjects not shredded yet (%s); retried at the next delete "
                        "or start-up", type(e).__name__)

    def erased_subjects(self, *, chunk_size: int = 10_000) -> list[Any]:
        """The subjects whose erasure keys are gone from the store (rows with id,
        collection_id, name): what a gallery restored from a backup holds of people deleted
        since (unreadable, but still rows); `Templates.purge_erased` deletes them."""
        sealer = self.seal.read_sealer(refresh=True)
        store = sealer.require_erasure("purging erased subjects")
        gone = []
        last = 0
        while True:
            with self.db.read() as conn:
                rows = conn.execute(
                    select(Subject.id, Subject.collection_id, Subject.name, Subject.sealed_key)
                    .where(Subject.id > last, func.length(Subject.sealed_key) == ERASABLE_SUBJECT_KEY_BYTES)
                    .order_by(Subject.id).limit(chunk_size)
                ).all()
            if not rows:
                break
            refs = {r.id: sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key) for r in rows}
            present = store.get(refs.values())
            gone += [r for r in rows if refs[r.id] not in present]
            last = int(rows[-1].id)
        return gone

    def complete_erasures(self) -> int:
        """Shred the erasure keys of deleted subjects (the `pending_erasures` outbox) and
        forget their cached ciphers; returns how many subjects were completed. Runs after
        every delete and at unlock; a no-op while the gallery is locked (the outbox waits)."""
        h = self.seal.state
        if h.sealer is None:
            return 0
        with self.db.read() as conn:
            rows = conn.execute(
                select(PendingErasure.id, PendingErasure.collection_id, PendingErasure.name, PendingErasure.sealed_key)
                .order_by(PendingErasure.id).limit(10_000)
            ).all()
        if not rows:
            return 0
        sealer = self.seal.read_sealer(refresh=True)
        refs = []
        for r in rows:
            try:
                ref = sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key)
            except TamperedError:  # under a data key re-keyed away: unreadable already
                ref = None
            if ref is not None:
                refs.append(ref)
            sealer.forget_subject(r.collection_id, r.name, r.sealed_key)
        if refs:
            sealer.require_erasure(f"shredding the erasure keys of deleted subjects ({len(refs)})").shred(refs)
        with self.db.write() as conn:
            conn.execute(delete(PendingErasure).where(PendingErasure.id.in_([r.id for r in rows])))
        return len(rows)

    def pending_erasures(self) -> int:
        with self.db.read() as conn:
            return int(conn.scalar(select(func.count()).select_from(PendingErasure)) or 0)
