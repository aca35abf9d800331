"""Sealed storage: the cryptography that keeps stored templates useless without a master key.

Why: any template the server can match without a secret can be matched by whoever copies it
(a database dump, a backup, an index snapshot); an attacker who enrolled ~`dim` chosen faces
first maps leaked templates back to raw embeddings by least squares. So storage holds only
AES-256-GCM ciphertext, and the secret that opens it lives elsewhere.

Key hierarchy (envelope encryption; docs/sealed-storage.md):

* the **master key** never enters the database. A `KeyProvider` wraps and unwraps with it:
  (`advplugin.gallery.master_keys`) `LocalKeyProvider` over a key file (default: in the key
  folder, outside the data folder) or the
  `ADVPLUGIN_MASTER_KEY` variable; a KMS (Vault Transit, a cloud KMS) is another subclass
  whose `wrap`/`unwrap` are the KMS's encrypt/decrypt calls;
* the **gallery data key** (32 random bytes) is stored in `sealing_keys`, wrapped by the
  master key: rotating the master key re-wraps one row (`advplugin db rewrap`);
* a **subject key** per subject (32 random bytes), stored in its `subjects` row, wrapped by
  the gallery data key: deleting the subject deletes its key, and re-keying the gallery
  re-wraps these small keys, never the templates;
* an **erasure key** per subject (32 random bytes) held only in the erasure key store,
  outside the database (`advplugin.gallery.erasure`): the key a subject's templates are
  sealed under is derived from both, so shredding the erasure key at delete time makes the
  subject unreadable in every copy of the database made before (crypto-shredding). Subjects
  sealed before the store existed (a 32-byte sealed plaintext) have no erasure key;
* every **template vector** is sealed under its subject's key with a fresh 96-bit nonce and
  associated data binding it to its row (collection, template id, scheme, scheme version,
  config digest, key id, dimension): a row swapped with another, moved to another collection
  or gallery, or replayed under other provenance fails authentication on read.

A sealed vector is `nonce (12) || ciphertext (4*dim) || tag (16)`: a fixed length per
dimension, so bulk inserts still ship one chunk as one bytea cut by the server, and a
plaintext row (4*dim bytes, a gallery not yet converted by `advplugin db seal`) is told
apart by its length alone.

Errors name rows and key ids, never key material or vector values.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
import threading
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from advplugin.errors import ConfigurationError, KeyMaterialError
from advplugin.gallery.erasure import REF_BYTES, ErasureKeyStore, random_pieces
from advplugin.keys import KEY_BYTES

NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes a sealed value has beyond its plaintext.
OVERHEAD = NONCE_BYTES + TAG_BYTES
_SERIAL = struct.Struct(">I")
#: A sealed subject key: gallery key serial (4) + nonce + 32-byte key + tag.
SUBJECT_KEY_BYTES = _SERIAL.size + OVERHEAD + KEY_BYTES
#: ... of a subject that has an erasure key (a marker byte and the erasure key's reference more).
ERASABLE_SUBJECT_KEY_BYTES = SUBJECT_KEY_BYTES + 1 + REF_BYTES
#: Snapshots are sealed in segments: AES-GCM in `cryptography` takes at most 2**31-1 bytes.
SEGMENT_BYTES = 1 << 26
_SUBJECT_CACHE = 200_000  # unwrapped subject keys kept (a cache; cleared when full)
#: First byte of a sealed subject key's plaintext when the subject has an erasure key (then:
#: marker, 32 key bytes, the erasure key's 16-byte reference in the store; a 32-byte
#: plaintext: a subject sealed before the erasure key store existed).
_ERASABLE = b"\x01"
#: Erasure-store hint for messages.
ERASURE_STORE_HINT = "ADVPLUGIN_ERASURE_KEY_STORE=<file or URL> (default: erasure-keys.db beside the master key)"


class SealingError(KeyMaterialError):
    """Base class of sealed-storage errors."""


class MasterKeyError(SealingError, ConfigurationError):
    """The master key is missing, unreadable, or not the one the gallery's key is wrapped by
    (a `ConfigurationError` too: the operator fixes it in the settings)."""


class TamperedError(SealingError):
    """A sealed value failed authentication: altered, swapped, moved, or under another key."""


class ErasedError(TamperedError):
    """A sealed value whose erasure key is not in the erasure key store: its subject (or
    snapshot) was deleted after this copy was made, or the store is not this gallery's."""


class ErasureStoreMissing(MasterKeyError):
    """The gallery's subjects have erasure keys, and this process was given no store."""


def sealed_size(dim: int) -> int:
    """Stored bytes of one sealed `dim`-value template."""
    return 4 * dim + OVERHEAD


def _part(p: object) -> bytes:
    if p is None:
        return b"\xff\xff\xff\xff"
    b = str(p).encode()
    return _SERIAL.pack(len(b)) + b


def associated_data(label: str, *parts: object) -> bytes:
    """Unambiguous bytes for AES-GCM's associated data: a label and length-prefixed parts
    (None and '' differ), so no two different rows can ever produce the same AD."""
    return b"advplugin/" + label.encode() + b"\0" + b"".join(_part(p) for p in parts)


@functools.lru_cache(maxsize=4096)
def _template_ad_head(collection_id: int) -> bytes:
    return associated_data("template/v1", collection_id)


@functools.lru_cache(maxsize=4096)
def _template_ad_tail(scheme: str, scheme_version: int, config_digest: str, key_id: str | None, dim: int) -> bytes:
    return b"".join(_part(p) for p in (scheme, scheme_version, config_digest, key_id, dim))


def template_ad(
    collection_id: int, template_id: int, scheme: str, scheme_version: int,
    config_digest: str, key_id: str | None, dim: int,
) -> bytes:
    """What a template's ciphertext is bound to: its row and everything that says how it
    was made. Changing any of these (a swap, a move, a forged provenance) breaks the tag.
    Equal to `associated_data("template/v1", collection_id, template_id, scheme, ...)`; the
    parts shared by many rows are cached (this runs once per row on every gallery read)."""
    tid = str(int(template_id)).encode()
    return (
        _template_ad_head(collection_id) + _SERIAL.pack(len(tid)) + tid
        + _template_ad_tail(scheme, scheme_version, config_digest, key_id, dim)
    )


@functools.lru_cache(maxsize=4096)
def _subject_ad_head(collection_id: int) -> bytes:
    return associated_data("subject-key/v1", collection_id)


def subject_key_ad(collection_id: int, name: str, serial: int) -> bytes:
    """What a sealed subject key is bound to: its collection, its subject's name and the data
    key serial. Equal to `associated_data("subject-key/v1", collection_id, name, serial)`,
    built from cached parts (it runs once per subject on a cold read)."""
    b = name.encode()
    return _subject_ad_head(collection_id) + _SERIAL.pack(len(b)) + b + _part(serial)


def _key_id(label: str, secret: bytes) -> str:
    """A one-way identifier of a data key (to name it in messages), never the key."""
    return hashlib.sha256(b"advplugin/" + label.encode() + b"/" + secret).hexdigest()[:16]


# -- data keys -----------------------------------------------------------------------------------
def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def gallery_key_id(secret: bytes) -> str:
    return _key_id("gallery-key-id", secret)


def gallery_key_context(serial: int) -> bytes:
    """What the master-key wrap of gallery data key `serial` is bound to."""
    return associated_data("gallery-key/v1", serial)


def _erasable_parts(plain: bytes) -> tuple[bytes, bytes | None]:
    """(subject key, erasure-store reference or None) of a sealed subject key's plaintext."""
    if len(plain) == KEY_BYTES:
        return plain, None
    return plain[1 : 1 + KEY_BYTES], plain[1 + KEY_BYTES :]


def _erasable_key(subject_key: bytes, erasure_key: bytes) -> bytes:
    """The key a subject's templates are sealed under when it has an erasure key."""
    return hashlib.sha256(b"advplugin/subject-key/v2\0" + subject_key + erasure_key).digest()


_Item = tuple[int, str, bytes]  # (collection id, subject name, sealed subject key)


class Sealer:
    """The unwrapped gallery data keys of one open gallery (by serial; the newest seals new
    subject keys), the erasure key store when the gallery has one, and a cache of subject
    ciphers. Thread-safe: AES-GCM objects are stateless per call and the cache is guarded."""

    def __init__(self, keys: dict[int, bytes], erasure: ErasureKeyStore | None = None) -> None:
        if not keys:
            raise ValueError("a sealer needs at least one gallery data key")
        self._keys = dict(keys)
        self._gallery = {s: AESGCM(k) for s, k in keys.items()}
        self.erasure = erasure
        self.current = max(keys)
        self._subjects: dict[_Item, AESGCM] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Sealer(serials={self.serials})"

    @property
    def serials(self) -> list[int]:
        return sorted(self._keys)

    def require_erasure(self, what: str) -> ErasureKeyStore:
        """The erasure key store, or `ErasureStoreMissing` saying that `what` needs one."""
        if self.erasure is None:
            raise ErasureStoreMissing(f"{what} needs the erasure key store, and this process was given none: {ERASURE_STORE_HINT}")
        return self.erasure

    def keys_for_rewrap(self) -> list[tuple[int, bytes]]:
        """(serial, data key) pairs, for re-wrapping under a new master key only."""
        return sorted(self._keys.items())

    # subject keys
    def new_subject_keys(self, collection_id: int, names: Sequence[str]) -> list[tuple[bytes, AESGCM]]:
        """Fresh subject keys: (sealed under the current gallery key, what the row stores;
        the cipher of the subject's templates, for the write that made it: no unwrap and no
        store lookup right after). With an erasure key store, each gets an erasure key
        there first (committed before any template is sealed under it)."""
        raws = random_pieces(len(names), KEY_BYTES)  # as `new_data_key`, in one read
        nonces = random_pieces(len(names), NONCE_BYTES)
        if self.erasure is None:
            return [
                (self._seal_subject_key(collection_id, n, r, nonce), AESGCM(r))
                for n, r, nonce in zip(names, raws, nonces, strict=True)
            ]
        taken = self.erasure.take(len(names))
        return [
            (self._seal_subject_key(collection_id, n, _ERASABLE + r + ref, nonce), AESGCM(_erasable_key(r, ek)))
            for n, r, (ref, ek), nonce in zip(names, raws, taken, nonces, strict=True)
        ]

    def _seal_subject_key(self, collection_id: int, name: str, plain: bytes, nonce: bytes | None = None) -> bytes:
        nonce = nonce or secrets.token_bytes(NONCE_BYTES)
        ad = subject_key_ad(collection_id, name, self.current)
        return _SERIAL.pack(self.current) + nonce + self._gallery[self.current].encrypt(nonce, plain, ad)

    @staticmethod
    def subject_key_serial(sealed: bytes) -> int:
        return int(_SERIAL.unpack_from(sealed)[0])

    def _unwrap_subject_key(self, collection_id: int, name: str, sealed: bytes) -> bytes:
        """The sealed plaintext: 32 key bytes, or the erasable marker, 32 key bytes and the
        erasure key's reference."""
        serial = self.subject_key_serial(sealed)
        aead = self._gallery.get(serial)
        if aead is None:
            raise TamperedError(f"subject {name!r} (collection {collection_id}) is sealed under gallery key #{serial}, which this gallery does not hold")
        ad = subject_key_ad(collection_id, name, serial)
        try:
            return aead.decrypt(sealed[_SERIAL.size : _SERIAL.size + NONCE_BYTES], sealed[_SERIAL.size + NONCE_BYTES :], ad)
        except InvalidTag:
            raise TamperedError(
                f"the key of subject {name!r} (collection {collection_id}) failed authentication "
                "(altered, or moved from another subject or gallery)"
            ) from None

    def erasure_ref_of(self, collection_id: int, name: str, sealed: bytes) -> bytes | None:
        """The erasure-store reference of a subject (None: it has no erasure key)."""
        return _erasable_parts(self._unwrap_subject_key(collection_id, name, sealed))[1]

    def subject_ciphers(self, items: Sequence[_Item], *, cache: bool = True) -> dict[_Item, AESGCM]:
        """The AES-GCM of each subject's templates, by (collection id, name, sealed key);
        the erasure keys of all of them in one store query. Cached by the sealed key (a
        re-wrapped key is simply a new entry); `cache=False` for bulk reads (an index
        rebuild visits each subject once: caching them all only fed the garbage collector).
        Raises `ErasedError` naming a subject whose erasure key is gone."""
        out: dict[_Item, AESGCM] = {}
        plains: dict[_Item, bytes] = {}
        for item in items:
            aead = self._subjects.get(item)
            if aead is not None:
                out[item] = aead
            elif item not in plains:
                plains[item] = self._unwrap_subject_key(*item)
        parts = {i: _erasable_parts(p) for i, p in plains.items()}
        erasable = [i for i, (_, ref) in parts.items() if ref is not None]
        found: dict[bytes, bytes] = {}
        if erasable:
            store = self.require_erasure(f"subject {erasable[0][1]!r} (it has an erasure key)")
            found = store.get(parts[i][1] for i in erasable)  # type: ignore[misc]
        for item, (key, ref) in parts.items():
            if ref is not None:
                ek = found.get(ref)
                if ek is None:
                    raise ErasedError(
                        f"subject {item[1]!r} (collection {item[0]}) has no erasure key in the "
                        f"{self.erasure.description if self.erasure else 'erasure key store'}: it was "
                        "deleted (crypto-shredded) after this copy of the database was made, or the "
                        "store is not this gallery's; a gallery restored from a backup drops such "
                        "subjects with `advplugin db purge-erased`"
                    )
                aead = AESGCM(_erasable_key(key, ek))
            else:
                aead = AESGCM(key)
            out[item] = aead
        if cache and plains:
            with self._lock:
                if len(self._subjects) + len(plains) > _SUBJECT_CACHE:
                    self._subjects.clear()
                self._subjects.update({i: out[i] for i in plains})
        return out

    def subject_cipher(self, collection_id: int, name: str, sealed: bytes, *, cache: bool = True) -> AESGCM:
        """The AES-GCM of one subject's templates (see `subject_ciphers`)."""
        item = (collection_id, name, sealed)
        return self.subject_ciphers([item], cache=cache)[item]

    def forget_subject(self, collection_id: int, name: str, sealed: bytes) -> None:
        """Drop a deleted subject's cipher from the cache (its key must not outlive it)."""
        with self._lock:
            self._subjects.pop((collection_id, name, sealed), None)

    def rewrap_subject_key(self, collection_id: int, name: str, sealed: bytes) -> bytes:
        """The same subject key sealed under the current gallery key (re-keying the gallery)."""
        return self._seal_subject_key(collection_id, name, self._unwrap_subject_key(collection_id, name, sealed))

    # template vectors
    @staticmethod
    def seal_vectors(ciphers: Sequence[AESGCM], ads: Sequence[bytes], vectors: np.ndarray) -> np.ndarray:
        """One sealed value per row, `nonce || ciphertext || tag`, as the rows of ONE uint8
        array (encrypted in place: no per-row bytes object to build and join again): a
        fresh random nonce each (96 bits: collisions are negligible far beyond any gallery
        size)."""
        data = np.ascontiguousarray(vectors, dtype="<f4")
        n = len(data)
        width = sealed_size(data.shape[1] if data.ndim == 2 else 0)
        out = np.empty((n, width), np.uint8)
        out[:, :NONCE_BYTES] = np.frombuffer(secrets.token_bytes(NONCE_BYTES * n), np.uint8).reshape(n, NONCE_BYTES)
        view, src = memoryview(out).cast("B"), memoryview(data).cast("B")
        size = width - OVERHEAD
        for i, (aead, ad) in enumerate(zip(ciphers, ads, strict=True)):
            at = i * width
            aead.encrypt_into(
                view[at : at + NONCE_BYTES], src[i * size : (i + 1) * size], ad, view[at + NONCE_BYTES : at + width]
            )
        return out

    @staticmethod
    def open_vector(aead: AESGCM, ad: bytes, sealed: bytes, template_id: int) -> bytes:
        try:
            return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
        except InvalidTag:
            raise TamperedError(
                f"template {template_id} failed authentication: its stored vector was altered, "
                "swapped with another row, moved from another collection or gallery, or its "
                "provenance columns were changed"
            ) from None

    # snapshots (whole blobs)
    def _snapshot_cipher(self, serial: int, erasure_key: bytes | None) -> AESGCM:
        key = self._keys.get(serial)
        if key is None:
            raise TamperedError(f"sealed under gallery key #{serial}, which this gallery does not hold")
        if erasure_key is None:
            return AESGCM(hashlib.sha256(b"advplugin/snapshot-key/v1" + key).digest())
        return AESGCM(hashlib.sha256(b"advplugin/snapshot-key/v2\0" + key + erasure_key).digest())

    def snapshot_erasure_key(self, scope: str) -> tuple[bytes, bytes] | None:
        """(reference, erasure key) for a new snapshot of `scope` (one index), or None without
        an erasure key store. `shred_old_snapshots` drops the older ones once it is written."""
        if self.erasure is None:
            return None
        ref = secrets.token_bytes(16)
        return ref, self.erasure.create([ref], kind=f"snapshot:{scope}")[ref]

    def shred_old_snapshots(self, scope: str, keep: bytes) -> None:
        if self.erasure is not None:
            self.erasure.shred_kind_except(f"snapshot:{scope}", keep)

    def snapshot_key_of(self, ref: bytes) -> bytes:
        """A snapshot's erasure key; `ErasedError` once a newer snapshot shredded it."""
        key = self.require_erasure("this snapshot (it has an erasure key)").get([ref]).get(ref)
        if key is None:
            raise ErasedError("the snapshot's erasure key was shredded (a newer snapshot replaced it)")
        return key

    def seal_blob(self, data: bytes | memoryview, ad: bytes, erasure_key: bytes | None = None) -> tuple[int, bytearray]:
        """(serial, sealed bytes) of a large blob, sealed in segments bound to their index and
        to their count (no truncation, reordering or splicing goes unnoticed), under a key
        derived from the gallery data key (and the blob's erasure key, when given). Encrypted
        in place into one buffer: a snapshot of 1M templates is 0.5 GB, and each extra copy
        would show in start-up time."""
        aead = self._snapshot_cipher(self.current, erasure_key)
        view = memoryview(data)
        n = max(1, -(-len(view) // SEGMENT_BYTES))
        out = bytearray(len(view) + n * OVERHEAD)
        dst = memoryview(out)
        pos = 0
        for i in range(n):
            seg = view[i * SEGMENT_BYTES : (i + 1) * SEGMENT_BYTES]
            nonce = secrets.token_bytes(NONCE_BYTES)
            dst[pos : pos + NONCE_BYTES] = nonce
            pos += NONCE_BYTES
            aead.encrypt_into(nonce, seg, ad + struct.pack(">QQ", i, n), dst[pos : pos + len(seg) + TAG_BYTES])
            pos += len(seg) + TAG_BYTES
        return self.current, out

    def open_blob(self, serial: int, sealed: bytes | memoryview, ad: bytes, erasure_key: bytes | None = None) -> bytes:
        """The blob `seal_blob` sealed; raises `TamperedError` if any segment fails."""
        aead = self._snapshot_cipher(serial, erasure_key)
        src = memoryview(sealed)
        seg = SEGMENT_BYTES + OVERHEAD
        n = max(1, -(-len(src) // seg))
        size = len(src) - n * OVERHEAD
        if size < 0:
            raise TamperedError("sealed blob is truncated")
        out = bytearray(size)
        dst = memoryview(out)
        pos = 0
        for i in range(n):
            part = src[i * seg : (i + 1) * seg]
            length = len(part) - OVERHEAD
            try:
                aead.decrypt_into(
                    part[:NONCE_BYTES], part[NONCE_BYTES:], ad + struct.pack(">QQ", i, n), dst[pos : pos + length]
                )
            except (InvalidTag, ValueError):
                raise TamperedError("sealed blob failed authentication") from None
            pos += length
        return bytes(out)
