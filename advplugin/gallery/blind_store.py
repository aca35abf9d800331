"""SQL storage of blind collections (docs/blind.md): `blind_blocks` and `blind_templates`.

SQL stays the truth, as for plaintext galleries: a block's ciphertexts and the map of which
subject sits in which slot are committed together, and the in-memory encrypted index
(`advplugin.gallery.blind_index`) follows them by block version.

Enrolment appends at a block's `fill` (the next free slot). The client encrypts its templates
at the slots it was told are free, so two clients that raced for one block would overwrite
each other's slots: the write transaction (serialised, like every gallery write) therefore
checks that `fill` is still what the client encrypted for and refuses otherwise
(`SlotConflict`); the client re-reads the layout and encrypts again.

Subjects are the gallery's own `subjects` rows, so listing and deleting subjects work as in
the other modes: deleting a subject cascades to its blind templates (its slots go dead).

`BlindStore` is a store of blind-collection rows in the gallery's database, built over a
`Gallery` (`advplugin.gallery.store`, the facade); its in-memory follower is
`advplugin.gallery.blind_index.EncryptedIndex`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, insert, select, update

from advplugin.errors import InvalidInputError
from advplugin.gallery.database import DEFAULT_COLLECTION
from advplugin.gallery.models import BlindBlock, BlindTemplate, Subject, utcnow
from advplugin.gallery.store import Gallery


class BlindError(InvalidInputError):
    """A blind write that cannot be applied; `code` names the reason for the service."""

    code = "blind_error"


class SlotConflict(BlindError):
    """The block's free slot moved since the client read it (another enrolment landed)."""

    code = "slot_conflict"


class KeyMismatch(BlindError):
    """The collection's blocks are under another HE key (or other parameters)."""

    code = "wrong_he_key"


@dataclass(frozen=True)
class OpenBlock:
    """Where the next enrolment goes: `block_id` None means a new block."""

    block_id: int | None
    fill: int
    capacity: int


@dataclass(frozen=True)
class BlockLayout:
    """The live slots of one block (deleted templates are absent) and who sits there."""

    block_id: int
    slots: np.ndarray  # int64
    template_ids: np.ndarray  # int64
    subjects: list[str]


@dataclass(frozen=True)
class Provenance:
    """How the templates were protected before encryption (recorded per template)."""

    scheme: str
    config_digest: str
    key_id: str | None
    extractor_name: str


class BlindStore:
    """Blind blocks and templates of a gallery (thread-safe: one connection per call)."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def bound_key(self, collection: str = DEFAULT_COLLECTION) -> tuple[str, str] | None:
        """(HE key id, params digest) the collection's blocks are under; None when empty."""
        cid = self.gallery.collection_id(collection)
        with self.gallery.db.read() as conn:
            row = conn.execute(
                select(BlindBlock.he_key_id, BlindBlock.params_digest).where(BlindBlock.collection_id == cid).limit(1)
            ).first()
        return (row[0], row[1]) if row else None

    def open_block(self, collection: str, capacity: int) -> OpenBlock:
        cid = self.gallery.collection_id(collection)
        with self.gallery.db.read() as conn:
            row = conn.execute(
                select(BlindBlock.id, BlindBlock.fill, BlindBlock.capacity)
                .where(BlindBlock.collection_id == cid, BlindBlock.fill < BlindBlock.capacity)
                .order_by(BlindBlock.id.desc()).limit(1)
            ).first()
        return OpenBlock(int(row[0]), int(row[1]), int(row[2])) if row else OpenBlock(None, 0, capacity)

    def enroll(
        self,
        collection: str,
        *,
        he_key_id: str,
        params_digest: str,
        capacity: int,
        block_id: int | None,
        offset: int,
        subjects: Sequence[str],
        provenance: Provenance,
        merge: Callable[[bytes | None], bytes],
    ) -> tuple[int, list[int]]:
        """Store `len(subjects)` templates at slots offset.. of block `block_id` (None: a new
        block, offset 0). `merge(old block data or None)` returns the new data (the
        homomorphic sum); it runs inside the write transaction, so the block cannot change
        between the check of `fill` and the write. Returns (block id, template ids)."""
        n = len(subjects)
        if n == 0:
            raise BlindError("nothing to enrol")
        if offset < 0 or offset + n > capacity:
            raise BlindError(f"slots {offset}..{offset + n - 1} do not fit a block of {capacity}")
        cid = self.gallery.collection_id(collection)
        now = utcnow()
        with self.gallery.db.write() as conn:
            bound = conn.execute(
                select(BlindBlock.he_key_id, BlindBlock.params_digest).where(BlindBlock.collection_id == cid).limit(1)
            ).first()
            if bound is not None and tuple(bound) != (he_key_id, params_digest):
                raise KeyMismatch(
                    f"this collection is encrypted under HE key id {bound[0]} (parameters {bound[1]}); "
                    f"the request is under {he_key_id} ({params_digest})"
                )
            if block_id is None:
                if offset != 0:
                    raise SlotConflict("a new block starts at slot 0")
                block_id = int(conn.scalar(
                    insert(BlindBlock).values(
                        collection_id=cid, he_key_id=he_key_id, params_digest=params_digest,
                        capacity=capacity, fill=n, version=1, data=merge(None),
                        created_at=now, updated_at=now,
                    ).returning(BlindBlock.id)
                ))
            else:
                row = conn.execute(
                    select(BlindBlock.fill, BlindBlock.capacity, BlindBlock.data)
                    .where(BlindBlock.id == block_id, BlindBlock.collection_id == cid)
                ).first()
                if row is None:
                    raise SlotConflict(f"no block {block_id} in this collection")
                if int(row[0]) != offset or int(row[1]) != capacity:
                    raise SlotConflict(
                        f"block {block_id} has its next free slot at {row[0]}, not {offset}: "
                        "re-read the layout and encrypt again"
                    )
                conn.execute(
                    update(BlindBlock).where(BlindBlock.id == block_id).values(
                        fill=offset + n, version=BlindBlock.version + 1, data=merge(bytes(row[2])),
                        updated_at=now,
                    )
                )
            sids = self.gallery.subjects.ids_for(conn, cid, subjects, create=True)
            rows = [
                {
                    "collection_id": cid, "subject_id": sids[name].id, "block_id": block_id,
                    "slot": offset + i, "scheme": provenance.scheme,
                    "config_digest": provenance.config_digest, "key_id": provenance.key_id,
                    "extractor_name": provenance.extractor_name, "created_at": now,
                }
                for i, name in enumerate(subjects)
            ]
            conn.execute(insert(BlindTemplate), rows)
            ids = conn.scalars(
                select(BlindTemplate.id).where(BlindTemplate.block_id == block_id, BlindTemplate.slot >= offset)
                .order_by(BlindTemplate.slot)
            ).all()
        return block_id, [int(i) for i in ids]

    # -- what the encrypted index follows ---------------------------------------------------------
    def block_versions(self, collection: str) -> dict[int, int]:
        cid = self.gallery.collection_id(collection)
        with self.gallery.db.read() as conn:
            rows = conn.execute(
                select(BlindBlock.id, BlindBlock.version).where(BlindBlock.collection_id == cid)
            ).all()
        return {int(i): int(v) for i, v in rows}

    def block_data(self, block_id: int) -> tuple[int, bytes] | None:
        """(version, data) of a block, read together; None if it is gone."""
        with self.gallery.db.read() as conn:
            row = conn.execute(
                select(BlindBlock.version, BlindBlock.data).where(BlindBlock.id == block_id)
            ).first()
        return (int(row[0]), bytes(row[1])) if row else None

    def layout_stamp(self, collection: str) -> tuple[int, int]:
        """(count, max id) of the collection's blind templates: changes with every insert
        (ids only grow) and delete, so a cached layout is re-read only when it changed."""
        cid = self.gallery.collection_id(collection)
        with self.gallery.db.read() as conn:
            n, top = conn.execute(
                select(func.count(BlindTemplate.id), func.max(BlindTemplate.id)).where(BlindTemplate.collection_id == cid)
            ).one()
        return int(n), int(top or 0)

    def layout(self, collection: str) -> dict[int, BlockLayout]:
        cid = self.gallery.collection_id(collection)
        with self.gallery.db.read() as conn:
            rows = conn.execute(
                select(BlindTemplate.block_id, BlindTemplate.slot, BlindTemplate.id, Subject.name)
                .join(Subject, Subject.id == BlindTemplate.subject_id)
                .where(BlindTemplate.collection_id == cid)
                .order_by(BlindTemplate.block_id, BlindTemplate.slot)
            ).all()
        out: dict[int, BlockLayout] = {}
        by_block: dict[int, list] = {}
        for r in rows:
            by_block.setdefault(int(r[0]), []).append(r)
        for bid, rs in by_block.items():
            out[bid] = BlockLayout(
                bid, np.array([r[1] for r in rs], np.int64), np.array([r[2] for r in rs], np.int64),
                [str(r[3]) for r in rs],
            )
        return out
