"""`SealKeys`: the sealing state of a gallery (`SealState`, `SealInfo`) and its data keys (the
`sealing_keys` table), the part a gallery holds as `gallery.seal`.

This module is state over SQL; `advplugin.gallery.sealing` is the cryptography it uses (the
`Sealer`, free of SQL). Why a part of its own: whether a gallery is sealed, which master key
wraps its data key and unlocking it are one concern, used by the vector codec on every read
and write. The jobs that change the keys (seal, re-wrap under a new master key, re-key under
a new data key) are `advplugin.gallery.sealing_jobs`.

States: no `sealing_keys` row = unsealed (plaintext vectors; what galleries of earlier
releases are). A row = sealed: every new vector is sealed; while `converting` (a `db seal`
still running) plaintext rows are still read, afterwards a plaintext row is refused as
tampering. A sealed gallery opened without its master key is *locked*: counts, subjects and
API keys work, any vector read or write raises `MasterKeyError` saying what to provide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, insert, select

from advplugin.gallery.database import Database
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import KeyProvider
from advplugin.gallery.models import SealingKey, Subject, Template, utcnow
from advplugin.gallery.sealing import (
    MasterKeyError,
    Sealer,
    gallery_key_context,
    gallery_key_id,
    new_data_key,
)

#: What a locked gallery's errors tell the operator to provide.
MASTER_KEY_HINT = "ADVPLUGIN_MASTER_KEY_FILE=<key file> or ADVPLUGIN_MASTER_KEY=<base64>"


@dataclass(frozen=True)
class SealInfo:
    sealed: bool
    converting: bool  # `db seal` has not finished: plaintext rows may remain
    unlocked: bool  # this process holds the data keys
    master_key_ids: list[str]  # master keys the data keys are wrapped by (normally one)
    serials: list[int]  # gallery data keys present (several only while re-keying)
    erasure_store: str | None = None  # where this process keeps erasure keys (None: nowhere)


@dataclass
class SealState:
    """What this process knows of a gallery's sealing, shared by the gallery and the handles
    of its transactions (`Gallery.transaction()`): a key unlocked or re-keyed in one is
    known to all."""

    provider: KeyProvider | None = None
    erasure: ErasureKeyStore | None = None
    sealer: Sealer | None = None
    sealed: bool = False
    converting: bool = False
    master_key_ids: list[str] = field(default_factory=list)


class SealKeys:
    """The sealing state of one gallery handle (`SealState`) and the sealers its parts
    write and read vectors with."""

    def __init__(self, db: Database, state: SealState | None = None) -> None:
        self.db = db
        self.state = state if state is not None else SealState()

    # -- state -----------------------------------------------------------------------------------
    def refresh(self, conn: Connection) -> None:
        """Re-read `sealing_keys`; unwrap data keys this process lacks (new ones appear
        while another process re-keys)."""
        rows = conn.execute(
            select(SealingKey.serial, SealingKey.wrapped, SealingKey.master_key_id, SealingKey.converting)
            .order_by(SealingKey.serial)
        ).all()
        h = self.state
        h.sealed = bool(rows)
        h.converting = bool(rows) and bool(rows[-1].converting)
        h.master_key_ids = sorted({r.master_key_id for r in rows})
        if not rows:
            h.sealer = None
            return
        if h.provider is None:
            return
        held = set(h.sealer.serials) if h.sealer is not None else set()
        if held == {int(r.serial) for r in rows}:
            return
        keys = {}
        for r in rows:
            try:
                keys[int(r.serial)] = h.provider.unwrap(r.wrapped, gallery_key_context(int(r.serial)))
            except MasterKeyError:
                raise MasterKeyError(
                    f"wrong master key for gallery {self.db.where()}: its data key #{r.serial} is "
                    f"wrapped by master key id {r.master_key_id}, but {h.provider.description} has "
                    f"key id {h.provider.key_id}"
                ) from None
        h.sealer = Sealer(keys, erasure=h.erasure)

    def seal_info(self) -> SealInfo:
        with self.db.read() as conn:
            self.refresh(conn)
        h = self.state
        return SealInfo(
            sealed=h.sealed, converting=h.converting, unlocked=h.sealer is not None,
            master_key_ids=list(h.master_key_ids),
            serials=list(h.sealer.serials) if h.sealer is not None else [],
            erasure_store=h.erasure.description if h.erasure is not None else None,
        )

    def locked(self) -> MasterKeyError:
        ids = ", ".join(self.state.master_key_ids) or "?"
        return MasterKeyError(
            f"gallery {self.db.where()} is sealed and this process has no master key (the data "
            f"key is wrapped by master key id {ids}); provide it: {MASTER_KEY_HINT}"
        )

    def write_sealer(self, conn: Connection) -> Sealer | None:
        """The sealer for a write in `conn` (None: unsealed gallery, write plaintext); raises
        when the gallery is sealed and locked. One tiny query under the write lock, so a
        gallery sealed meanwhile by another process is never written in plaintext."""
        self.refresh(conn)
        if not self.state.sealed:
            return None
        if self.state.sealer is None:
            raise self.locked()
        return self.state.sealer

    def read_sealer(self, *, refresh: bool = False) -> Sealer:
        """The sealer for reading sealed rows; raises when locked."""
        if refresh or self.state.sealer is None:
            with self.db.read() as conn:
                self.refresh(conn)
        if self.state.sealer is None:
            raise self.locked()
        return self.state.sealer

    def snapshot_sealer(self) -> Sealer | None:
        """What index snapshots are sealed with: None for an unsealed gallery; raises when
        the gallery is sealed and locked (a snapshot must never be written in plaintext)."""
        with self.db.read() as conn:
            return self.write_sealer(conn)

    # -- unlocking and sealing -------------------------------------------------------------------
    def unlock(
        self, provider: KeyProvider, *, erasure: ErasureKeyStore | None = None, seal_if_empty: bool = True
    ) -> SealInfo:
        """Use `provider`'s master key: unwrap the data keys (raises `MasterKeyError` naming
        both key ids if it is the wrong one); seal the gallery now if it holds no template
        yet and `seal_if_empty`. With `erasure`, subjects sealed from now on get erasure keys
        there (docs/sealed-storage.md); a gallery whose subjects have them cannot be opened
        without it (`ErasureStoreMissing`), nor with a store that holds none of them."""
        self.state.provider = provider
        self.state.erasure = erasure
        self.state.sealer = None
        with self.db.write() as conn:
            self.refresh(conn)
            if not self.state.sealed and seal_if_empty and conn.scalar(select(Template.id).limit(1)) is None:
                self.create_key(conn, serial=1, converting=False)
                self.refresh(conn)
        if self.state.sealer is not None:
            self._check_erasure_store(self.state.sealer)
        return self.seal_info()

    def _check_erasure_store(self, sealer: Sealer, sample: int = 20) -> None:
        """At unlock, not at the first read: the newest subjects' keys say whether the gallery
        needs an erasure key store, and whether the one given holds their keys (all of them
        missing: a wrong store, not a few deleted subjects of a restored backup)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(Subject.collection_id, Subject.name, Subject.sealed_key)
                .where(Subject.sealed_key.is_not(None)).order_by(Subject.id.desc()).limit(sample)
            ).all()
        refs = [ref for r in rows if (ref := sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key))]
        if not refs:
            return
        store = sealer.require_erasure(f"gallery {self.db.where()} (its subjects have erasure keys)")
        if not store.get(refs):
            raise MasterKeyError(
                f"the {store.description} holds none of the erasure keys of the newest "
                f"{len(refs)} subjects of gallery {self.db.where()}: it is not this gallery's store"
            )

    def create_key(self, conn: Connection, *, serial: int, converting: bool) -> None:
        provider = self.state.provider
        if provider is None:
            raise MasterKeyError(f"sealing needs a master key: {MASTER_KEY_HINT}")
        key = new_data_key()
        conn.execute(
            insert(SealingKey).values(
                serial=serial, key_id=gallery_key_id(key),
                wrapped=provider.wrap(key, gallery_key_context(serial)),
                master_key_id=provider.key_id, converting=converting, created_at=utcnow(),
            )
        )
