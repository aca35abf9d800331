"""`SealingJobs`: the jobs that change a gallery's keys, in one place: sealing an unsealed
gallery (`begin_sealing`, `seal_templates`), giving old subjects erasure keys
(`make_subjects_erasable`), re-wrapping the data keys under a new master key (`rewrap`) and
moving every subject key to a new data key (`begin_rekey`, `rekey_subjects`).

Why a part of its own: these run from `advplugin db` (resumable, chunk by chunk), never on
the service's request path, and each changes rows of several parts (sealing keys, subjects,
templates) under the write lock; the state they change is `SealKeys`'.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Connection, bindparam, delete, func, select, update

from advplugin.gallery.codec import SealedSubject, VectorCodec
from advplugin.gallery.database import Database
from advplugin.gallery.master_keys import KeyProvider
from advplugin.gallery.models import SealingKey, Subject, Template
from advplugin.gallery.seal_state import MASTER_KEY_HINT, SealInfo, SealKeys
from advplugin.gallery.sealing import SUBJECT_KEY_BYTES, MasterKeyError, gallery_key_context
from advplugin.gallery.subjects import Subjects


class SealingJobs:
    """The key-changing jobs of one gallery handle."""

    def __init__(self, db: Database, seal: SealKeys, codec: VectorCodec, subjects: Subjects) -> None:
        self.db, self.seal, self.codec, self.subjects = db, seal, codec, subjects

    def begin_sealing(self) -> SealInfo:
        """Seal an unsealed gallery: create its data key (marked converting while plaintext
        rows remain, see `seal_templates`). Idempotent."""
        with self.db.write() as conn:
            self.seal.refresh(conn)
            if not self.seal.state.sealed:
                has_rows = conn.scalar(select(Template.id).limit(1)) is not None
                self.seal.create_key(conn, serial=1, converting=has_rows)
                self.seal.refresh(conn)
        return self.seal.seal_info()

    def finish_converting(self, conn: Connection) -> None:
        conn.execute(update(SealingKey).values(converting=False))

    # -- master key rotation: re-wrap ---------------------------------------------------------
    def rewrap(self, new_provider: KeyProvider) -> int:
        """Re-wrap every data key under `new_provider`'s master key in ONE transaction (rows
        and subject keys untouched; atomic: a crash leaves all under the old key or all under
        the new). Needs the current master key (this gallery unlocked). Returns how many
        data keys were re-wrapped; afterwards only the new master key opens the gallery."""
        with self.db.write() as conn:
            self.seal.refresh(conn)
            if not self.seal.state.sealed:
                raise MasterKeyError(f"gallery {self.db.where()} is not sealed; run `advplugin db seal` first")
            if self.seal.state.sealer is None:
                raise self.seal.locked()
            n = 0
            for serial, key in self.seal.state.sealer.keys_for_rewrap():
                conn.execute(
                    update(SealingKey).where(SealingKey.serial == serial).values(
                        wrapped=new_provider.wrap(key, gallery_key_context(serial)),
                        master_key_id=new_provider.key_id,
                    )
                )
                n += 1
        self.seal.state.provider = new_provider
        return n

    # -- data key rotation: re-key -----------------------------------------------------------------
    def begin_rekey(self) -> int:
        """Start moving every subject key to a NEW gallery data key (resumable with
        `rekey_subjects`); returns the new key's serial. Idempotent while one is running."""
        with self.db.write() as conn:
            sealer = self.seal.write_sealer(conn)
            if sealer is None:
                raise MasterKeyError(f"gallery {self.db.where()} is not sealed; run `advplugin db seal` first")
            serials = sealer.serials
            if len(serials) > 1:
                return max(serials)  # a re-key already under way: continue it
            serial = max(serials) + 1
            self.seal.create_key(conn, serial=serial, converting=self.seal.state.converting)
            self.seal.refresh(conn)
            return serial

    def rekey_subjects(self, *, chunk_size: int = 10_000) -> Iterator[int]:
        """Re-seal the subject keys still under an older gallery key, `chunk_size` per
        transaction (yields how many each time); when none remain, delete the older keys, so
        a copy of the database taken before has subject keys under a key the gallery no
        longer holds. Template rows are not touched (their subject keys are unchanged)."""
        while True:
            with self.db.write() as conn:
                sealer = self.seal.write_sealer(conn)
                if sealer is None or len(sealer.serials) == 1:
                    return
                current = sealer.current
                rows = conn.execute(
                    select(Subject.id, Subject.collection_id, Subject.name, Subject.sealed_key)
                    .where(Subject.sealed_key.is_not(None), _serial_prefix() != _serial_bytes(current))
                    .order_by(Subject.id)
                    .limit(chunk_size)
                ).all()
                if rows:
                    conn.execute(
                        update(Subject).where(Subject.id == bindparam("sid")).values(sealed_key=bindparam("k")),
                        [
                            {"sid": r.id, "k": sealer.rewrap_subject_key(r.collection_id, r.name, r.sealed_key)}
                            for r in rows
                        ],
                    )
                else:
                    conn.execute(delete(SealingKey).where(SealingKey.serial != current))
            if not rows:
                with self.db.read() as conn:
                    self.seal.refresh(conn)
                return
            yield len(rows)

    def subjects_under_old_keys(self) -> int:
        sealer = self.seal.read_sealer(refresh=True)
        with self.db.read() as conn:
            return int(
                conn.scalar(
                    select(func.count()).select_from(Subject).where(
                        Subject.sealed_key.is_not(None), _serial_prefix() != _serial_bytes(sealer.current)
                    )
                )
                or 0
            )


    def seal_templates(self, *, chunk_size: int = 10_000) -> Iterator[int]:
        """Convert an unsealed gallery in place (`advplugin db seal`): create its data key,
        then seal the plaintext rows in id order, `chunk_size` per transaction (yields how
        many each time), and finally mark the gallery sealed, after which a plaintext row is
        refused. Resumable: a rerun seals only what is still plaintext. Sealing changes no
        vector's meaning, so nothing is logged for the index. Needs the master key."""
        if self.seal.state.provider is None:
            raise self.seal.locked() if self.seal.state.sealed else MasterKeyError(
                f"sealing needs a master key: {MASTER_KEY_HINT}"
            )
        self.begin_sealing()
        last = 0
        while True:
            with self.db.write() as conn:
                sealer = self.seal.write_sealer(conn)
                assert sealer is not None
                rows = conn.execute(
                    select(*self.codec.vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.id > last, func.length(Template.vector) == 4 * Template.dim)
                    .order_by(Template.id)
                    .limit(chunk_size)
                ).all()
                if not rows:
                    self.finish_converting(conn)
                    self.seal.refresh(conn)
                    return
                by_collection: dict[int, list[Any]] = {}
                for r in rows:
                    by_collection.setdefault(int(r.collection_id), []).append(r)
                params = []
                for cid, part in by_collection.items():
                    keys = self.subjects.ids_for(conn, cid, [r.name for r in part], create=False, sealer=sealer)
                    sealed = self.codec.encode(
                        sealer, cid, [int(r.id) for r in part], [(r.name, keys[r.name]) for r in part],
                        np.stack([np.frombuffer(r.vector, dtype="<f4") for r in part]),
                        scheme=[r.scheme for r in part], scheme_version=[r.scheme_version for r in part],
                        config_digest=[r.config_digest for r in part], key_id=[r.key_id for r in part],
                    )
                    params += [{"tid": int(r.id), "v": v} for r, v in zip(part, sealed, strict=True)]
                conn.execute(
                    update(Template).where(Template.id == bindparam("tid")).values(vector=bindparam("v"))
                    .execution_options(synchronize_session=False),
                    params,
                )
                last = int(rows[-1].id)
            yield len(rows)

    def make_subjects_erasable(self, *, chunk_size: int = 1000) -> Iterator[int]:
        """Give every subject sealed before the gallery had an erasure key store a NEW
        subject key with an erasure key, re-sealing its templates under it, `chunk_size`
        subjects per transaction (yields how many each time; resumable: a subject's key
        length says whether it is done). Part of `advplugin db seal`. A copy of the database
        made before still holds the old subject keys: `db rewrap --new-data-key` retires
        the data key that opens them. Nothing is logged for the index (no vector changes
        meaning)."""
        self.seal.read_sealer(refresh=True).require_erasure("making subjects erasable")
        while True:
            with self.db.write() as conn:
                sealer = self.seal.write_sealer(conn)
                assert sealer is not None
                subjects = conn.execute(
                    select(Subject.id, Subject.collection_id, Subject.name)
                    .where(func.length(Subject.sealed_key) == SUBJECT_KEY_BYTES)
                    .order_by(Subject.id).limit(chunk_size)
                ).all()
                if not subjects:
                    return
                rows = conn.execute(
                    select(*self.codec.vector_columns())
                    .join(Subject, Subject.id == Template.subject_id)
                    .where(Template.subject_id.in_([r.id for r in subjects]))
                    .order_by(Template.id)
                ).all()
                vectors = self.codec.decode(rows)  # under the old subject keys
                new_keys: dict[tuple[int, str], SealedSubject] = {}
                for cid in {int(r.collection_id) for r in subjects}:
                    names = [r.name for r in subjects if r.collection_id == cid]
                    for n, (k, c) in zip(names, sealer.new_subject_keys(cid, names), strict=True):
                        new_keys[cid, n] = SealedSubject(0, k, c)
                conn.execute(
                    update(Subject).where(Subject.id == bindparam("sid")).values(sealed_key=bindparam("k")),
                    [{"sid": r.id, "k": new_keys[int(r.collection_id), r.name].key} for r in subjects],
                )
                params = []
                for cid in {int(r.collection_id) for r in rows}:
                    part = [(r, v) for r, v in zip(rows, vectors, strict=True) if r.collection_id == cid]
                    sealed = self.codec.encode(
                        sealer, cid, [int(r.id) for r, _ in part], [(r.name, new_keys[cid, r.name]) for r, _ in part],
                        np.stack([v for _, v in part]),
                        scheme=[r.scheme for r, _ in part], scheme_version=[r.scheme_version for r, _ in part],
                        config_digest=[r.config_digest for r, _ in part], key_id=[r.key_id for r, _ in part],
                    )
                    params += [{"tid": int(r.id), "v": b} for (r, _), b in zip(part, sealed, strict=True)]
                if params:
                    conn.execute(
                        update(Template).where(Template.id == bindparam("tid")).values(vector=bindparam("v"))
                        .execution_options(synchronize_session=False),
                        params,
                    )
            yield len(subjects)

    def count_unerasable(self) -> int:
        """Sealed subjects without an erasure key (sealed before the store existed)."""
        q = select(func.count()).select_from(Subject).where(func.length(Subject.sealed_key) == SUBJECT_KEY_BYTES)
        with self.db.read() as conn:
            return int(conn.scalar(q) or 0)

    def count_unsealed(self) -> int:
        """Templates still stored in plaintext (a full scan: for status and tests)."""
        q = select(func.count()).select_from(Template).where(func.length(Template.vector) == 4 * Template.dim)
        with self.db.read() as conn:
            return int(conn.scalar(q) or 0)


def _serial_prefix() -> ColumnElement[bytes]:
    """The gallery-key serial a sealed subject key starts with (4 bytes), in SQL."""
    return func.substr(Subject.sealed_key, 1, 4)


def _serial_bytes(serial: int) -> bytes:
    return serial.to_bytes(4, "big")
