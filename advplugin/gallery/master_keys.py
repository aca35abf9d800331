"""Master keys: what wraps a gallery's data keys, kept outside the database.

`KeyProvider` is the interface a KMS implements; `LocalKeyProvider` holds the key in this
process (a key file or a base64 variable). Why a module of its own: the service, the CLI and
the opener choose and load master keys, while the rest of `advplugin.gallery.sealing` (the
row and snapshot cryptography) never needs to know where one came from.
"""

from __future__ import annotations

import base64
import os
import secrets
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from advplugin.gallery.sealing import NONCE_BYTES, MasterKeyError, associated_data
from advplugin.keys import KEY_BYTES, Key, load_key, make_private_dir, write_key


class KeyProvider(ABC):
    """Wraps and unwraps data keys with a master key kept outside the database.

    A KMS plugs in here: `wrap` = the KMS's encrypt (e.g. Vault Transit
    `POST /transit/encrypt/<name>` with `context`), `unwrap` = its decrypt, `key_id` = the
    KMS key's name (and version), `description` = where it is. The gallery calls `unwrap`
    once per data key when it opens, `wrap` when a gallery is sealed or re-wrapped, so a
    remote call per request never happens.
    """

    @property
    @abstractmethod
    def key_id(self) -> str:
        """Identifies the master key (recorded beside each wrapped key; not secret)."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the master key comes from, for messages (never the key)."""

    @abstractmethod
    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """The data key encrypted and authenticated under the master key, bound to `context`."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; raises `MasterKeyError` when this master key cannot open `wrapped`."""


class LocalKeyProvider(KeyProvider):
    """A master key held in this process: from a key file (rules of `advplugin.keys`: 32
    bytes, created O_EXCL with mode 0600, refused when group or others can read it) or from
    a base64 environment variable. It wraps with AES-256-GCM under a key derived for this
    purpose only, so even a key file reused by mistake as a scheme key leaks nothing."""

    def __init__(self, key: Key, description: str) -> None:
        self._aead = AESGCM(key.derive("master-wrap/v1", 32))
        self._key_id = key.key_id
        self._description = description

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, create: bool = False) -> LocalKeyProvider:
        """Load a master key file; with `create`, make one (0600, never overwriting) when it
        is missing. Raises `MasterKeyError` saying what is wrong."""
        path = Path(path)
        if create and not path.exists():
            make_private_dir(path.parent)
            try:
                write_key(path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        try:
            key = load_key(path)
        except FileNotFoundError:
            raise MasterKeyError(f"master key file {path} not found") from None
        except (PermissionError, ValueError) as e:
            raise MasterKeyError(f"master key file: {e}") from None
        return cls(key, f"master key file {path}")

    @classmethod
    def from_base64(cls, value: str, *, variable: str = "ADVPLUGIN_MASTER_KEY") -> LocalKeyProvider:
        """A master key given as base64 of 32 bytes (e.g. in an environment variable)."""
        try:
            secret = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            raise MasterKeyError(f"{variable} is not valid base64") from None
        if len(secret) != KEY_BYTES:
            raise MasterKeyError(f"{variable} must hold {KEY_BYTES} bytes (base64), got {len(secret)}")
        return cls(Key(secret), variable)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def description(self) -> str:
        return self._description

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data_key, associated_data("master-wrap/v1", context))

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], associated_data("master-wrap/v1", context)
            )
        except InvalidTag:
            raise MasterKeyError(f"{self._description} (key id {self._key_id}) cannot unwrap this data key") from None
