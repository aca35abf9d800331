"""`Gallery`: the protected-template database (SQLite or PostgreSQL), composed of parts.

Each part is a class of its own module over one `Database` handle, given the other parts it
uses; none inherits from another:

* `db` (`advplugin.gallery.database.Database`): the engine, serialised write transactions,
  collections;
* `seal` (`seal_state.SealKeys`): whether the gallery is sealed, unlocking it, the sealers;
* `codec` (`codec.VectorCodec`): the one place vectors are sealed and opened;
* `changes` (`changelog.ChangeLog`): the `template_changes` outbox the index replays;
* `subjects` (`subjects.Subjects`): people by name, with their sealed keys;
* `outbox` (`outbox.ErasureOutbox`): erasure keys of deleted subjects still to be shredded;
* `templates` (`templates.Templates`): template writes, deletes and reads;
* `sealing` (`sealing_jobs.SealingJobs`): seal, re-wrap, re-key, make subjects erasable;
* `audit` (`audit.AuditLog`) and `api_keys` (`apikeys.ApiKeyStore`).

A transaction is an explicit handle: `with gallery.transaction() as g` builds the same parts
over a `Database` bound to one write transaction (sharing this gallery's `SealState`), so
everything called on `g` commits together. A component depends on the part it uses
(`gallery.api_keys` for authentication, `gallery.changes` for an index follower); the
gallery's own methods of the same names delegate to the parts while callers move over.

"store" names four things in this package: this module is the gallery itself (the facade
over its parts). The others are stores *of one thing*: `apikeys.ApiKeyStore` (hashed API
keys, a part of the gallery, in its database), `erasure.ErasureKeyStore` (erasure keys,
deliberately outside the gallery database) and `blind_store.BlindStore` (the SQL rows of
blind collections).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from advplugin.gallery.apikeys import ApiKeyStore
from advplugin.gallery.audit import AuditLog
from advplugin.gallery.changelog import ChangeLog
from advplugin.gallery.codec import VectorCodec
from advplugin.gallery.database import Database
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import KeyProvider
from advplugin.gallery.outbox import ErasureOutbox
from advplugin.gallery.seal_state import SealKeys, SealState
from advplugin.gallery.sealing_jobs import SealingJobs
from advplugin.gallery.subjects import Subjects
from advplugin.gallery.templates import Templates

__all__ = ["Gallery"]


class _Part:
    """A method (or property) of the gallery that is one of its parts': `add_templates =
    _Part("templates")` is `gallery.templates.add_templates`."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gallery: Gallery | None, owner: type | None = None) -> Any:
        if gallery is None:
            return self
        return getattr(getattr(gallery, self.part), self.name)


class Gallery:
    """The gallery database: templates, subjects, the change log, API keys, audit and
    collections. Open with `Gallery.open(url)`; thread-safe (one engine, a connection per
    call)."""

    def __init__(self, db: Database, state: SealState | None = None) -> None:
        self.db = db
        self.seal = SealKeys(db, state)
        self.codec = VectorCodec(self.seal)
        self.changes = ChangeLog(db)
        self.audit = AuditLog(db)
        self.api_keys = ApiKeyStore(db)
        self.subjects = Subjects(db, self.seal)
        self.outbox = ErasureOutbox(db, self.seal)
        self.templates = Templates(db, self.seal, self.codec, self.changes, self.subjects, self.outbox)
        self.sealing = SealingJobs(db, self.seal, self.codec, self.subjects)

    @classmethod
    def open(
        cls, url: str, *, upgrade: bool = False, master_key: KeyProvider | None = None,
        erasure: ErasureKeyStore | None = None, seal_new: bool = True,
    ) -> Gallery:
        """Open the database at `url` (`Database.open`: refuses one not at the newest schema
        revision unless `upgrade`); with `master_key`, unlock a sealed gallery (a wrong key
        raises `MasterKeyError` now, not at the first read) and seal a gallery that holds no
        template yet (unless `seal_new` is False); `erasure`: its erasure key store."""
        gallery = cls(Database.open(url, upgrade=upgrade))
        try:
            if master_key is not None:
                gallery.seal.unlock(master_key, erasure=erasure, seal_if_empty=seal_new)
            else:
                gallery.seal.seal_info()  # know now whether it is sealed (plaintext rows are refused then)
        except BaseException:
            gallery.close()
            raise
        return gallery

    def close(self) -> None:
        if not self.db.in_transaction and self.seal.state.erasure is not None:
            self.seal.state.erasure.close()  # its engine's pool (the store itself stays usable)
        self.db.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Gallery]:
        """ONE serialised write transaction (`Database.transaction`): yields this gallery's
        parts over a handle bound to it. Inside a transaction, joins it."""
        if self.db.in_transaction:
            yield self
            return
        with self.db.transaction(durable=durable) as db:
            yield Gallery(db, self.seal.state)

    # -- the parts' own methods, while callers move to the parts (`_Part`) --------------------
    engine = _Part("db")
    dialect = _Part("db")
    connection = _Part("db")
    checkpoint = _Part("db")
    collection_id = _Part("db")
    collections = _Part("db")

    seal_info = _Part("seal")
    unlock = _Part("seal")
    snapshot_sealer = _Part("seal")

    begin_sealing = _Part("sealing")
    seal_templates = _Part("sealing")
    make_subjects_erasable = _Part("sealing")
    count_unerasable = _Part("sealing")
    count_unsealed = _Part("sealing")
    rewrap = _Part("sealing")
    begin_rekey = _Part("sealing")
    rekey_subjects = _Part("sealing")
    subjects_under_old_keys = _Part("sealing")

    last_change_seq = _Part("changes")
    change_stamp = _Part("changes")
    watch_changes = _Part("changes")
    changes_since = _Part("changes")
    key_ids_changed = _Part("changes")

    record_audit = _Part("audit")
    audit_events = _Part("audit")
    count_audit_events = _Part("audit")

    create_api_key = _Part("api_keys")
    create_api_key_hash = _Part("api_keys")
    active_api_keys = _Part("api_keys")
    list_api_keys = _Part("api_keys")
    configure_api_key = _Part("api_keys")
    api_key_hashes = _Part("api_keys")
    revoke_api_keys = _Part("api_keys")

    add_subject = _Part("subjects")
    get_subject = _Part("subjects")
    list_subjects = _Part("subjects")
    count_subjects = _Part("subjects")
    subject_template_ids = _Part("subjects")
    subject_renames = _Part("subjects")
    forget_subject_rename = _Part("subjects")

    complete_erasures = _Part("outbox")
    complete_erasures_or_warn = _Part("outbox")
    pending_erasures = _Part("outbox")

    add_templates = _Part("templates")
    replace_templates = _Part("templates")
    delete_templates = _Part("templates")
    delete_subject = _Part("templates")
    purge_erased = _Part("templates")
    iter_templates = _Part("templates")
    get_templates = _Part("templates")
    template_rows = _Part("templates")
    template_subjects = _Part("templates")
    count_templates = _Part("templates")
    provenance = _Part("templates")
    has_templates = _Part("templates")
