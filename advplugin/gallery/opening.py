"""Opening a gallery: the one way from a database URL and its keys to a `Gallery` in use.

Why one opener: the service, `advplugin db` and `advplugin migrate` open the same galleries,
and must agree on what opening does with keys (docs/sealed-storage.md): which are required,
which may be created and when, and which refusal names which setting. Three copies had
drifted apart. It lives in the gallery layer and takes plain arguments (the URL, where the
master key comes from, where the erasure key store is, and the upgrade and sealing policy),
so any caller can use it; `advplugin.install` resolves those arguments from `Settings`.

What opening does:
- a sealed gallery is unlocked with the master key, or opening fails saying which key is
  missing or wrong (never a crash at the first request, never an empty answer), and creates
  nothing: a key made beside a gallery that needs the real one would hide the real one. A
  missing erasure key store is made only when no subject needs one yet. Erasures that a
  killed process left pending are completed;
- a gallery without templates is sealed now (new galleries are sealed by default), making
  the master key and the erasure key store when missing;
- an unsealed gallery with templates keeps working as it is, with a reminder to seal it.

Refusals are `ConfigurationError`s (a `MasterKeyError`, wrong or unreadable key, is one):
the operator's settings are what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from advplugin.errors import ConfigurationError
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.master_keys import KeyProvider
from advplugin.gallery.sealing import ErasureStoreMissing
from advplugin.gallery.store import Gallery

__all__ = ["MasterKeySource", "open_erasure_store", "open_gallery"]


@dataclass(frozen=True)
class MasterKeySource:
    """Where a gallery's master key comes from. Asked only when the gallery needs a key, so
    that opening an unsealed gallery reads no key, and a key is made only for a gallery being
    sealed now.

    `load(create)`: the key, or None when there is none (only when `create` is False; with
    `create` a missing key is made). `where`: what the refusal of a sealed gallery names
    when there is none, e.g. "<file> does not exist"."""

    load: Callable[[bool], KeyProvider | None]
    where: str

    @classmethod
    def given(cls, provider: KeyProvider) -> MasterKeySource:
        """A key already at hand (a KMS, a key from the environment)."""
        return cls(lambda _create: provider, provider.description)


def open_gallery(
    url: str,
    *,
    master_key: MasterKeySource,
    erasure_store: str | Path,
    upgrade: bool = False,
    seal_new: bool = True,
    checkpoint: bool = False,
) -> Gallery:
    """The gallery at `url`, unlocked (see the module's docstring). `erasure_store`: a file or
    a SQLAlchemy URL (`ErasureKeyStore.open`). `upgrade`: apply the schema migrations first
    (else a database at an older revision raises `NotMigratedError`). `seal_new=False` (a dry
    run, a repair) leaves an unsealed gallery as it is. `checkpoint`: fold SQLite's WAL into
    the database once open (a WAL left by a killed process may still hold deleted pages)."""
    gallery = Gallery.open(url, upgrade=upgrade)
    try:
        _unlock(gallery, master_key, erasure_store, seal_new=seal_new)
        if checkpoint:
            gallery.checkpoint()
    except BaseException:
        gallery.close()
        raise
    return gallery


def open_erasure_store(location: str | Path, *, create: bool = True) -> ErasureKeyStore | None:
    """The erasure key store at `location` (a file or a SQLAlchemy URL). Made when missing only
    with `create`; else None when it does not exist. One that cannot be opened is a
    `ConfigurationError` naming the location and the kind of failure (not its text, which
    could quote a URL's password)."""
    try:
        return ErasureKeyStore.open(location, create=create)
    except ErasureStoreMissing:
        return None
    except (OSError, SQLAlchemyError) as e:
        raise ConfigurationError(f"cannot open the erasure key store {location}: {type(e).__name__}") from None


def _unlock(gallery: Gallery, master_key: MasterKeySource, erasure_store: str | Path, *, seal_new: bool) -> None:
    info = gallery.seal_info()
    if info.sealed:
        provider = master_key.load(False)
        if provider is None:
            raise ConfigurationError(
                f"the gallery is sealed (its data key is wrapped by master key id "
                f"{', '.join(info.master_key_ids)}), but no master key was given: "
                f"{master_key.where}. Set ADVPLUGIN_MASTER_KEY_FILE=<the master key file> or "
                "ADVPLUGIN_MASTER_KEY=<base64> (docs/sealed-storage.md)"
            )
        _unlock_sealed(gallery, provider, erasure_store)
        gallery.complete_erasures()  # a delete interrupted before its erasure key went
    elif not seal_new:
        return
    elif gallery.templates.is_empty():
        provider = master_key.load(True)
        assert provider is not None
        gallery.unlock(provider, erasure=open_erasure_store(erasure_store))
    else:
        print(
            "advplugin: WARNING: this gallery is not sealed; a copy of its database or "
            "snapshots reveals its templates. Seal it with `advplugin db seal` "
            "(docs/sealed-storage.md)",
            flush=True,
        )


def _unlock_sealed(gallery: Gallery, provider: KeyProvider, erasure_store: str | Path) -> None:
    """Unlock a sealed gallery without leaving debris: a missing erasure key store is made
    only when the gallery needs none yet (no subject has an erasure key: sealed by a release
    before erasure keys existed, or no subject yet). Were it made beside a gallery whose
    subjects have erasure keys, the next start would find an empty store where the real one
    belongs; instead opening stops and names the setting."""
    store = open_erasure_store(erasure_store, create=False)
    if store is None:
        try:
            gallery.unlock(provider, erasure=None)
        except ErasureStoreMissing:
            raise ConfigurationError(
                f"the gallery's subjects have erasure keys, and the erasure key store {erasure_store} "
                "does not exist. Restore it there, or point ADVPLUGIN_ERASURE_KEY_STORE at it "
                "(a file or a SQLAlchemy URL); nothing was created (docs/sealed-storage.md)"
            ) from None
        store = open_erasure_store(erasure_store)
    gallery.unlock(provider, erasure=store)
