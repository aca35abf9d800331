"""Start-up checks: open the gallery (unlocking it with the master key when it is sealed,
sealing it when it is new), refuse to serve one this service cannot match correctly, and
make sure a fresh gallery has an API key. Each check says what to run.

Why refuse instead of serving: templates of another scheme, another configuration of the
scheme, another dimension, or under a key this service lacks give meaningless scores, which
look like answers (a wrong person identified) rather than errors.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from advplugin.gallery.apikeys import hash_api_key
from advplugin.gallery.audit import Actor
from advplugin.gallery.database import sqlite_path
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.sealing import (
    ErasureStoreMissing,
    KeyProvider,
    LocalKeyProvider,
    MasterKeyError,
)
from advplugin.gallery.store import Gallery
from advplugin.keys import make_private_dir
from advplugin.service.protection import ROTATION_DOC, ConfigurationError, Protection
from advplugin.settings import Settings


def prepare_data_dir(data_dir: Path) -> None:
    """The data folder, owner-only (0700): it holds the gallery and its snapshots. Folders
    made for it are 0700 too (`.advplugin/` of the default layout), and an existing folder
    of ours with a wider mode is tightened: the data folder, and the default layout's
    `.advplugin/` (which an earlier release made 0755 and filled with keys)."""
    make_private_dir(data_dir)
    data_dir = data_dir.absolute()
    for folder in (data_dir, data_dir.parent) if data_dir.parent.name == ".advplugin" else (data_dir,):
        st = folder.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            folder.chmod(0o700)


def key_location_warnings(settings: Settings) -> list[str]:
    """What is wrong with where the keys are: a key or the erasure key store inside the
    folder that holds the data folder (`.advplugin/` of an earlier release's layout), or
    inside a folder the operator declares backed up (ADVPLUGIN_BACKUP_PATHS). Either way
    one copy of that folder holds the data and the keys that open it: the master key opens
    every sealed template, the erasure store re-opens subjects deleted after the copy.

    Only files that exist are named (a key given as ADVPLUGIN_MASTER_KEY has no file)."""
    data = settings.data_dir.absolute()
    db = sqlite_path(settings.resolved_database_url)
    homes = [data.parent] + ([Path(db).absolute().parent.parent] if db else [])
    store = settings.resolved_erasure_key_store
    keys = {
        "the scheme key": settings.resolved_key_file if settings.mode == "images" else None,
        "the master key": settings.resolved_master_key_file if settings.master_key is None else None,
        "the erasure key store": Path(store) if "://" not in store else None,
    }
    warnings = []
    for what, path in keys.items():
        if path is None or not path.exists():
            continue
        path = path.absolute()
        near = next((h for h in homes if path.is_relative_to(h)), None)
        if near is not None:
            warnings.append(
                f"{what} ({path}) is inside {near}, which also holds the gallery's data: a copy "
                "or backup of that folder opens the sealed gallery, deleted subjects included. "
                "Move it out (ADVPLUGIN_KEY_DIR, docs/sealed-storage.md, \"Where the keys live\")"
            )
        for backup in settings.backup_paths:
            if path.is_relative_to(backup.absolute()):
                warnings.append(
                    f"{what} ({path}) is inside the backed-up folder {backup.absolute()} "
                    "(ADVPLUGIN_BACKUP_PATHS): its backups re-open what a delete erased. Keep it "
                    "out of the gallery's backups (docs/sealed-storage.md, \"Where the keys live\")"
                )
    return warnings


def warn_key_locations(settings: Settings) -> None:
    for w in key_location_warnings(settings):
        print(f"advplugin: WARNING: {w}", flush=True)


def open_gallery(settings: Settings) -> Gallery:
    """The gallery database, unlocked (`unlock_gallery`). Embedded default only: a brand-new
    SQLite file in the data folder is created and migrated. An existing database is never
    migrated implicitly."""
    prepare_data_dir(settings.data_dir)
    fresh = settings.database_url is None and not (settings.data_dir / "gallery.db").exists()
    gallery = Gallery.open(settings.resolved_database_url, upgrade=fresh)
    try:
        unlock_gallery(gallery, settings)
        gallery.checkpoint()  # a WAL left by a killed process may still hold deleted pages
    except BaseException:
        gallery.close()
        raise
    return gallery


def master_key_provider(settings: Settings, *, create: bool = False) -> KeyProvider | None:
    """The master key of the settings: ADVPLUGIN_MASTER_KEY (base64), else the master key
    file (made 0600 when missing and `create`); None when neither exists. Raises
    ConfigurationError for a key that is malformed or readable by others."""
    try:
        if settings.master_key is not None:
            if settings.master_key_file is not None:
                raise ConfigurationError(
                    "set ADVPLUGIN_MASTER_KEY or ADVPLUGIN_MASTER_KEY_FILE, not both"
                )
            return LocalKeyProvider.from_base64(settings.master_key.get_secret_value())
        path = settings.resolved_master_key_file
        if not path.exists() and not create:
            return None
        made = not path.exists()
        provider = LocalKeyProvider.from_file(path, create=create)
    except MasterKeyError as e:
        raise ConfigurationError(str(e)) from None
    if made:
        print(
            f"advplugin: created master key file {path} (key id {provider.key_id}); back it up "
            "and keep it apart from the data and its backups: without it the sealed gallery "
            "cannot be read",
            flush=True,
        )
    return provider


def erasure_key_store(settings: Settings, *, create: bool = True) -> ErasureKeyStore | None:
    """The erasure key store of the settings. Made when missing only with `create`; else
    None when it does not exist (`ErasureKeyStore.open`)."""
    try:
        return ErasureKeyStore.open(settings.resolved_erasure_key_store, create=create)
    except ErasureStoreMissing:
        return None
    except (OSError, SQLAlchemyError) as e:
        raise ConfigurationError(
            f"cannot open the erasure key store {settings.resolved_erasure_key_store}: {type(e).__name__}"
        ) from None


def _unlock_sealed(gallery: Gallery, provider: KeyProvider, settings: Settings) -> None:
    """Unlock a sealed gallery without leaving debris: a missing erasure key store is made
    only when the gallery needs none yet (no subject has an erasure key: sealed by a release
    before erasure keys existed, or no subject yet). Were it made beside a gallery whose
    subjects have erasure keys, the next start would find an empty store where the real one
    belongs; instead start-up stops and names the setting."""
    store = erasure_key_store(settings, create=False)
    if store is None:
        where = settings.resolved_erasure_key_store
        try:
            gallery.unlock(provider, erasure=None)
        except ErasureStoreMissing:
            raise ConfigurationError(
                f"the gallery's subjects have erasure keys, and the erasure key store {where} "
                "does not exist. Restore it there, or point ADVPLUGIN_ERASURE_KEY_STORE at it "
                "(a file or a SQLAlchemy URL); nothing was created (docs/sealed-storage.md)"
            ) from None
        store = erasure_key_store(settings)
    gallery.unlock(provider, erasure=store)


def unlock_gallery(gallery: Gallery, settings: Settings, *, seal_new: bool = True) -> None:
    """A sealed gallery is unlocked with the master key, or start-up fails saying which key
    is missing or wrong (never a crash at the first request, never an empty answer). A
    gallery without templates is sealed now (new galleries are sealed by default). An
    unsealed gallery with templates keeps working as it is, with a reminder to seal it.
    `seal_new=False` (a dry run) leaves an unsealed gallery as it is."""
    info = gallery.seal_info()
    try:
        if info.sealed:
            provider = master_key_provider(settings)
            if provider is None:
                raise ConfigurationError(
                    f"the gallery is sealed (its data key is wrapped by master key id "
                    f"{', '.join(info.master_key_ids)}), but no master key was given: "
                    f"{settings.resolved_master_key_file} does not exist. Set "
                    "ADVPLUGIN_MASTER_KEY_FILE=<the master key file> or "
                    "ADVPLUGIN_MASTER_KEY=<base64> (docs/sealed-storage.md)"
                )
            _unlock_sealed(gallery, provider, settings)
            gallery.complete_erasures()  # a delete interrupted before its erasure key went
        elif not seal_new:
            return
        elif gallery.count_templates(collection=None) == 0:
            provider = master_key_provider(settings, create=True)
            assert provider is not None
            gallery.unlock(provider, erasure=erasure_key_store(settings))
        else:
            print(
                "advplugin: WARNING: this gallery is not sealed; a copy of its database or "
                "snapshots reveals its templates. Seal it with `advplugin db seal` "
                "(docs/sealed-storage.md)",
                flush=True,
            )
    except MasterKeyError as e:
        raise ConfigurationError(str(e)) from None


def check_gallery_matches(gallery: Gallery, protection: Protection, settings: Settings) -> None:
    """Refuse a gallery whose templates were made by another scheme, configuration or
    dimension, or under a key this service does not hold. Retires the previous key at once
    when a rotation has already finished."""
    e = protection.expected
    ours = (e.scheme, e.scheme_version, e.output_dim, e.config_digest)
    by_key: dict[str | None, int] = {}
    for row in gallery.provenance(collection=None):
        if (row["scheme"], row["scheme_version"], row["dim"], row["config_digest"]) != ours:
            raise ConfigurationError(
                f"the gallery holds {row['count']} templates of scheme {row['scheme']} "
                f"v{row['scheme_version']} (config {row['config_digest']}), key id {row['key_id']}, "
                f"dim {row['dim']}, but this service protects with {e.scheme} v{e.scheme_version} "
                f"(config {e.config_digest}), key id {e.key_id}, dim {e.output_dim}; migrate or "
                "re-enrol them first, or, for a gallery of other scheme options (an earlier release "
                "of a trained scheme), serve it with those: ADVPLUGIN_SCHEME_OPTIONS='{\"release\": 1}'"
            )
        kid = row["key_id"]
        by_key[kid] = by_key.get(kid, 0) + int(row["count"])  # type: ignore[call-overload]
    unknown = [k for k in by_key if k not in protection.served_key_ids()]
    if unknown:
        raise ConfigurationError(key_mismatch_message(protection, settings, unknown, by_key))
    if protection.previous is not None:
        old = protection.previous.metadata.key_id
        if old in by_key:
            print(
                f"advplugin: serving during a key rotation: {by_key[old]} templates under the "
                f"previous key id {old}, {by_key.get(e.key_id, 0)} under key id {e.key_id}; "
                "finish it with `advplugin rotate-key`",
                flush=True,
            )
        else:
            protection.retire_previous()


def key_mismatch_message(
    protection: Protection,
    settings: Settings,
    unknown: list[str | None],
    by_key: Mapping[str | None, int] | None = None,
) -> str:
    """What is wrong and what to run, when templates are under a key this service lacks."""
    e = protection.expected
    if by_key:
        held = ", ".join(
            f"{n} under key id {k}" + (" (this service's key)" if k == e.key_id else "")
            for k, n in by_key.items()
        )
        found = f"the gallery holds templates {held}"
    else:
        found = f"the gallery now holds templates under key id {', '.join(map(str, unknown))}"
    if settings.mode == "templates":
        return (
            f"{found}, but clients protect with key id {e.key_id} (ADVPLUGIN_TEMPLATE_KEY_ID). "
            "Template mode holds no key, so it cannot match a gallery under two keys: finish "
            "the key rotation (`advplugin rotate-key`), then restart with "
            f"ADVPLUGIN_TEMPLATE_KEY_ID=<the new key id> and give clients the new key ({ROTATION_DOC})"
        )
    return (
        f"{found}, and this service holds no key for {', '.join(map(str, unknown))}. During a "
        "key rotation OLD -> NEW, run the service with ADVPLUGIN_KEY_FILE=<NEW key file> and "
        "ADVPLUGIN_PREVIOUS_KEY_FILE=<OLD key file> (it answers correctly throughout), and "
        "finish the rotation with `advplugin rotate-key --old-key OLD --new-key NEW`; "
        f"otherwise use the key file these templates were made with ({ROTATION_DOC})"
    )


def bootstrap_api_key(gallery: Gallery, settings: Settings) -> None:
    """A gallery without API keys gets one: ADVPLUGIN_API_KEY's (stored hashed), or a new
    one written to data_dir/api-key (0600) and announced."""
    if gallery.api_key_hashes():
        return
    service = Actor("service")
    if settings.api_key is not None:
        gallery.create_api_key_hash(hash_api_key(settings.api_key.get_secret_value()), "bootstrap", actor=service)
        if settings.api_key_exact_scores:
            gallery.configure_api_key("bootstrap", exact_scores=True, actor=service)
        return
    api_key = gallery.create_api_key("bootstrap", actor=service)
    if settings.api_key_exact_scores:
        gallery.configure_api_key("bootstrap", exact_scores=True, actor=service)
    path = settings.data_dir / "api-key"
    if path.exists():
        path.unlink()
    _write_secret_file(path, api_key)
    print(f"advplugin: created an API key, stored hashed; the key is in {path} (mode 0600)", flush=True)


def _write_secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
