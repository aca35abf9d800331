"""`GalleryKeys`: the sealing state of a gallery and its data keys (`sealing_keys`).

Why a room of its own: whether a gallery is sealed, which master key wraps its data key,
unlocking it, and the key operations (seal, re-wrap under a new master key, re-key under a
new data key) are one concern, used by the templates room on every vector read and write
and by `advplugin db`. The cryptography itself is `advplugin.gallery.sealing`.

States: no `sealing_keys` row = unsealed (plaintext vectors; what galleries of earlier
releases are). A row = sealed: every new vector is sealed; while `converting` (a `db seal`
still running) plaintext rows are still read, afterwards a plaintext row is refused as
tampering. A sealed gallery opened without its master key is *locked*: counts, subjects and
API keys work, any vector read or write raises `MasterKeyError` saying what to provide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

from sqlalchemy import ColumnElement, Connection, bindparam, delete, func, insert, select, update

from advplugin.gallery.database import Database
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.models import SealingKey, Subject, Template, utcnow
from advplugin.gallery.sealing import (
    KeyProvider,
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
class _SealHolder:
    """Shared by a gallery and its transaction views (they are shallow copies)."""

    provider: KeyProvider | None = None
    erasure: ErasureKeyStore | None = None
    sealer: Sealer | None = None
    sealed: bool = False
    converting: bool = False
    master_key_ids: list[str] = field(default_factory=list)


class GalleryKeys(Database):
    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine)
        self._seal = _SealHolder()

    @classmethod
    def open(
        cls, url: str, *, upgrade: bool = False, master_key: KeyProvider | None = None,
        erasure: ErasureKeyStore | None = None, seal_new: bool = True,
    ) -> Self:
        """Open (see `Database.open`); with `master_key`, unlock a sealed gallery (a wrong
        key raises `MasterKeyError` now, not at the first read) and seal a gallery that holds
        no template yet (unless `seal_new` is False); `erasure`: its erasure key store."""
        db = super().open(url, upgrade=upgrade)
        try:
            if master_key is not None:
                db.unlock(master_key, erasure=erasure, seal_if_empty=seal_new)
            else:
                db.seal_info()  # know now whether it is sealed (plaintext rows are refused then)
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        if self._conn is None and self._seal.erasure is not None:
            self._seal.erasure.close()  # its engine's pool (the store itself stays usable)
        super().close()

    # -- state -----------------------------------------------------------------------------------
    def _refresh(self, conn: Connection) -> None:
        """Re-read `sealing_keys`; unwrap data keys this process lacks (new ones appear
        while another process re-keys)."""
        rows = conn.execute(
            select(SealingKey.serial, SealingKey.wrapped, SealingKey.master_key_id, SealingKey.converting)
            .order_by(SealingKey.serial)
        ).all()
        h = self._seal
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
                    f"wrong master key for gallery {self._where()}: its data key #{r.serial} is "
                    f"wrapped by master key id {r.master_key_id}, but {h.provider.description} has "
                    f"key id {h.provider.key_id}"
                ) from None
        h.sealer = Sealer(keys, erasure=h.erasure)

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def seal_info(self) -> SealInfo:
        with self._read() as conn:
            self._refresh(conn)
        h = self._seal
        return SealInfo(
            sealed=h.sealed, converting=h.converting, unlocked=h.sealer is not None,
            master_key_ids=list(h.master_key_ids),
            serials=list(h.sealer.serials) if h.sealer is not None else [],
            erasure_store=h.erasure.description if h.erasure is not None else None,
        )

    def _locked(self) -> MasterKeyError:
        ids = ", ".join(self._seal.master_key_ids) or "?"
        return MasterKeyError(
            f"gallery {self._where()} is sealed and this process has no master key (the data "
            f"key is wrapped by master key id {ids}); provide it: {MASTER_KEY_HINT}"
        )

    def _write_sealer(self, conn: Connection) -> Sealer | None:
        """The sealer for a write in `conn` (None: unsealed gallery, write plaintext); raises
        when the gallery is sealed and locked. One tiny query under the write lock, so a
        gallery sealed meanwhile by another process is never written in plaintext."""
        self._refresh(conn)
        if not self._seal.sealed:
            return None
        if self._seal.sealer is None:
            raise self._locked()
        return self._seal.sealer

    def _read_sealer(self, *, refresh: bool = False) -> Sealer:
        """The sealer for reading sealed rows; raises when locked."""
        if refresh or self._seal.sealer is None:
            with self._read() as conn:
                self._refresh(conn)
        if self._seal.sealer is None:
            raise self._locked()
        return self._seal.sealer

    def snapshot_sealer(self) -> Sealer | None:
        """What index snapshots are sealed with: None for an unsealed gallery; raises when
        the gallery is sealed and locked (a snapshot must never be written in plaintext)."""
        with self._read() as conn:
            return self._write_sealer(conn)

    # -- unlocking and sealing -------------------------------------------------------------------
    def unlock(
        self, provider: KeyProvider, *, erasure: ErasureKeyStore | None = None, seal_if_empty: bool = True
    ) -> SealInfo:
        """Use `provider`'s master key: unwrap the data keys (raises `MasterKeyError` naming
        both key ids if it is the wrong one); seal the gallery now if it holds no template
        yet and `seal_if_empty`. With `erasure`, subjects sealed from now on get erasure keys
        there (docs/sealed-storage.md); a gallery whose subjects have them cannot be opened
        without it (`ErasureStoreMissing`), nor with a store that holds none of them."""
        self._seal.provider = provider
        self._seal.erasure = erasure
        self._seal.sealer = None
        with self._write() as conn:
            self._refresh(conn)
            if not self._seal.sealed and seal_if_empty and conn.scalar(select(Template.id).limit(1)) is None:
                self._create_key(conn, serial=1, converting=False)
                self._refresh(conn)
        if self._seal.sealer is not None:
            self._check_erasure_store(self._seal.sealer)
        return self.seal_info()

    def _check_erasure_store(self, sealer: Sealer, sample: int = 20) -> None:
        """At unlock, not at the first read: the newest subjects' keys say whether the gallery
        needs an erasure key store, and whether the one given holds their keys (all of them
        missing: a wrong store, not a few deleted subjects of a restored backup)."""
        with self._read() as conn:
            rows = conn.execute(
                select(Subject.collection_id, Subject.name, Subject.sealed_key)
                .where(Subject.sealed_key.is_not(None)).order_by(Subject.id.desc()).limit(sample)
            ).all()
        refs = [ref for r in rows if (ref := sealer.erasure_ref_of(r.collection_id, r.name, r.sealed_key))]
        if not refs:
            return
        store = sealer.require_erasure(f"gallery {self._where()} (its subjects have erasure keys)")
        if not store.get(refs):
            raise MasterKeyError(
                f"the {store.description} holds none of the erasure keys of the newest "
                f"{len(refs)} subjects of gallery {self._where()}: it is not this gallery's store"
            )

    def _create_key(self, conn: Connection, *, serial: int, converting: bool) -> None:
        provider = self._seal.provider
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

    def begin_sealing(self) -> SealInfo:
        """Seal an unsealed gallery: create its data key (marked converting while plaintext
        rows remain, see `TemplateRepository.seal_templates`). Idempotent."""
        with self._write() as conn:
            self._refresh(conn)
            if not self._seal.sealed:
                has_rows = conn.scalar(select(Template.id).limit(1)) is not None
                self._create_key(conn, serial=1, converting=has_rows)
                self._refresh(conn)
        return self.seal_info()

    def _finish_converting(self, conn: Connection) -> None:
        conn.execute(update(SealingKey).values(converting=False))

    # -- master key rotation: re-wrap ---------------------------------------------------------
    def rewrap(self, new_provider: KeyProvider) -> int:
        """Re-wrap every data key under `new_provider`'s master key in ONE transaction (rows
        and subject keys untouched; atomic: a crash leaves all under the old key or all under
        the new). Needs the current master key (this gallery unlocked). Returns how many
        data keys were re-wrapped; afterwards only the new master key opens the gallery."""
        with self._write() as conn:
            self._refresh(conn)
            if not self._seal.sealed:
                raise MasterKeyError(f"gallery {self._where()} is not sealed; run `advplugin db seal` first")
            if self._seal.sealer is None:
                raise self._locked()
            n = 0
            for serial, key in self._seal.sealer.keys_for_rewrap():
                conn.execute(
                    update(SealingKey).where(SealingKey.serial == serial).values(
                        wrapped=new_provider.wrap(key, gallery_key_context(serial)),
                        master_key_id=new_provider.key_id,
                    )
                )
                n += 1
        self._seal.provider = new_provider
        return n

    # -- data key rotation: re-key -----------------------------------------------------------------
    def begin_rekey(self) -> int:
        """Start moving every subject key to a NEW gallery data key (resumable with
        `rekey_subjects`); returns the new key's serial. Idempotent while one is running."""
        with self._write() as conn:
            sealer = self._write_sealer(conn)
            if sealer is None:
                raise MasterKeyError(f"gallery {self._where()} is not sealed; run `advplugin db seal` first")
            serials = sealer.serials
            if len(serials) > 1:
                return max(serials)  # a re-key already under way: continue it
            serial = max(serials) + 1
            self._create_key(conn, serial=serial, converting=self._seal.converting)
            self._refresh(conn)
            return serial

    def rekey_subjects(self, *, chunk_size: int = 10_000) -> Iterator[int]:
        """Re-seal the subject keys still under an older gallery key, `chunk_size` per
        transaction (yields how many each time); when none remain, delete the older keys, so
        a copy of the database taken before has subject keys under a key the gallery no
        longer holds. Template rows are not touched (their subject keys are unchanged)."""
        while True:
            with self._write() as conn:
                sealer = self._write_sealer(conn)
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
                with self._read() as conn:
                    self._refresh(conn)
                return
            yield len(rows)

    def subjects_under_old_keys(self) -> int:
        sealer = self._read_sealer(refresh=True)
        with self._read() as conn:
            return int(
                conn.scalar(
                    select(func.count()).select_from(Subject).where(
                        Subject.sealed_key.is_not(None), _serial_prefix() != _serial_bytes(sealer.current)
                    )
                )
                or 0
            )


def _serial_prefix() -> ColumnElement[bytes]:
    """The gallery-key serial a sealed subject key starts with (4 bytes), in SQL."""
    return func.substr(Subject.sealed_key, 1, 4)


def _serial_bytes(serial: int) -> bytes:
    return serial.to_bytes(4, "big")

