"""One install's gallery, from its `Settings`: the data folder, which master key and erasure
key store open it, whether those keys sit where a copy of the data would take them along,
and opening the gallery with them through the one opener (`advplugin.gallery.opening`).

Why a module of its own, at this level: these decisions read `Settings`, which sits above the
gallery in the layers, so they cannot live in `advplugin.gallery`; and both the service and
the CLI (`advplugin db`, `advplugin migrate`) need them, while the CLI may not import the
service's start-up (an import contract). So they sit in their own layer between `settings`
and `service | cli`: the service adds what is its own (creating a brand-new embedded gallery,
the scheme's key, the API key bootstrap), the CLI its flags (`--database-url`,
`--master-key-file`), and both open a gallery the same way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from advplugin.errors import ConfigurationError
from advplugin.gallery.database import sqlite_path
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import KeyProvider, LocalKeyProvider
from advplugin.gallery.opening import MasterKeySource, open_erasure_store, open_gallery
from advplugin.gallery.store import Gallery
from advplugin.keys import make_private_dir
from advplugin.settings import Settings

__all__ = [
    "erasure_key_store",
    "key_location_warnings",
    "master_key_provider",
    "master_key_source",
    "open_configured_gallery",
    "prepare_data_dir",
]


def open_configured_gallery(
    settings: Settings,
    url: str | None = None,
    *,
    upgrade: bool = False,
    seal_new: bool = True,
    checkpoint: bool = False,
) -> Gallery:
    """The gallery at `url` (default: the settings' database), opened by
    `advplugin.gallery.opening.open_gallery` with the settings' master key and erasure key
    store; the policy arguments are the opener's."""
    return open_gallery(
        url or settings.resolved_database_url,
        master_key=master_key_source(settings),
        erasure_store=settings.resolved_erasure_key_store,
        upgrade=upgrade,
        seal_new=seal_new,
        checkpoint=checkpoint,
    )


def master_key_source(settings: Settings) -> MasterKeySource:
    """The settings' master key, read (or made) only when the opener asks for it."""
    return MasterKeySource(
        lambda create: master_key_provider(settings, create=create),
        f"{settings.resolved_master_key_file} does not exist",
    )


def master_key_provider(settings: Settings, *, create: bool = False) -> KeyProvider | None:
    """The master key of the settings: ADVPLUGIN_MASTER_KEY (base64), else the master key
    file (made 0600 when missing and `create`); None when neither exists. Raises
    `MasterKeyError` (a `ConfigurationError`) for a key that is malformed or readable by
    others. A KMS provider plugs in here (docs/sealed-storage.md)."""
    if settings.master_key is not None:
        if settings.master_key_file is not None:
            raise ConfigurationError("set ADVPLUGIN_MASTER_KEY or ADVPLUGIN_MASTER_KEY_FILE, not both")
        return LocalKeyProvider.from_base64(settings.master_key.get_secret_value())
    path = settings.resolved_master_key_file
    if not path.exists() and not create:
        return None
    made = not path.exists()
    provider = LocalKeyProvider.from_file(path, create=create)
    if made:
        print(
            f"advplugin: created master key file {path} (key id {provider.key_id}); back it up "
            "and keep it apart from the data and its backups: without it the sealed gallery "
            "cannot be read",
            flush=True,
        )
    return provider


def erasure_key_store(settings: Settings, *, create: bool = True) -> ErasureKeyStore | None:
    """The erasure key store of the settings (`open_erasure_store`)."""
    return open_erasure_store(settings.resolved_erasure_key_store, create=create)


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
