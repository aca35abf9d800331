"""Secret keys for keyed protectors.

A key is 32 random bytes in a file of its own, created with mode 0600 and never stored in
the gallery database: a leaked database without the key file must be useless to an
attacker. Everything else (galleries, reports, API responses) refers to a key only by its
key id, a one-way digest that identifies the key without revealing it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

KEY_BYTES = 32
_HEADER = "advplugin-key-v1:"


@dataclass(frozen=True)
class Key:
    """A secret key. `repr` shows only the key id so a key never lands in logs or tracebacks."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise ValueError(f"a key must be exactly {KEY_BYTES} bytes")

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"advplugin/key-id/" + self.secret).hexdigest()[:16]

    def derive(self, label: str, n_bytes: int) -> bytes:
        """Deterministic pseudo-random bytes for one purpose (scheme, dimension, ...).

        SHAKE-256 over key and label: independent streams per label, stable across
        platforms and numpy versions, so the same key always gives the same transform.
        """
        return hashlib.shake_256(b"advplugin/derive/" + label.encode() + b"/" + self.secret).digest(
            n_bytes
        )

    def __str__(self) -> str:
        return f"Key(key_id={self.key_id})"


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a folder, each folder this call creates made 0700 (owner only) in one
    system call: `Path.mkdir(parents=True, mode=...)` gives the parents it makes the
    default mode (0755 under the usual umask), which left `.advplugin/` readable by all."""
    path = Path(path).absolute()
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by another process
    return path


def write_key(
    path: str | os.PathLike[str], key: Key | None = None, *, overwrite: bool = False
) -> Key:
    """Create a key file readable by its owner only.

    The file is opened with O_EXCL and mode 0600 in one system call, so there is no moment
    when the secret sits in a file with wider permissions, and an existing key (which may
    protect a whole gallery) is never silently replaced.
    """
    key = key or Key.generate()
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"key file {path} already exists; refusing to overwrite a key that may protect a gallery"
        ) from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(_HEADER + base64.b64encode(key.secret).decode() + "\n")
    return key


def load_key(path: str | os.PathLike[str]) -> Key:
    """Read a key file, refusing one that group or others can read (as ssh does)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key file {path} not found (create one with `advplugin keygen`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"key file {path} has mode {mode:o}; it must be readable by its owner only "
            f"(run `chmod 600 {path}`)"
        )
    text = path.read_text().strip()
    if not text.startswith(_HEADER):
        raise ValueError(f"{path} is not an advplugin key file")
    try:
        secret = base64.b64decode(text[len(_HEADER) :], validate=True)
    except ValueError:
        raise ValueError(f"{path} is not a valid advplugin key file (bad encoding)") from None
    return Key(secret)
