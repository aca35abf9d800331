"""Blind mode (ADVPLUGIN_MODE=blind, docs/blind.md): the service stores and searches CKKS
ciphertexts of protected templates and returns encrypted scores; it holds no key of any kind.

Requests and responses are `advplugin.he.wire` messages (a JSON header and raw ciphertexts).
Everything in them is untrusted: the header is checked field by field, the ciphertexts are
loaded by `ServerContext.load`, which refuses anything that is not a fresh ciphertext of the
service's parameters, and every failure is a `ServiceError` 4xx with a message that names
the problem and never echoes bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from advplugin.gallery import Gallery
from advplugin.gallery.blind_index import EncryptedIndex
from advplugin.gallery.blind_store import (
    BlindError,
    BlindStore,
    KeyMismatch,
    Provenance,
    SlotConflict,
)
from advplugin.gallery.names import canonical_name
from advplugin.he import CiphertextError, HEParams, ServerContext, WireError, unpack
from advplugin.he import pack as pack_message
from advplugin.service.errors import ServiceError
from advplugin.service.protection import Protection
from advplugin.settings import Settings

#: A header bigger than this is refused (subjects of a full block: 4,096 x 255 characters
#: as \\uXXXX escapes fit).
MAX_HEADER_BYTES = 8 * 1024 * 1024


def max_request_bytes(params: HEParams) -> int:
    """The largest legitimate blind request: `dim` ciphertexts of about 128 KiB plus the
    header (the app's body limit for /blind routes, enforced before anything is read)."""
    return params.dim * (params.max_ciphertext_bytes + 4) + MAX_HEADER_BYTES + 64


class BlindService:
    """The blind collections of a service: their SQL store, encrypted indexes and checks."""

    def __init__(self, gallery: Gallery, protection: Protection, settings: Settings) -> None:
        self.params = HEParams(dim=protection.expected.output_dim)
        self.context = ServerContext(self.params)
        self.store = BlindStore(gallery)
        self.protection = protection
        self.settings = settings
        self._indexes: dict[str, EncryptedIndex] = {}
        self._lock = threading.Lock()

    def index(self, collection: str) -> EncryptedIndex:
        with self._lock:
            if collection not in self._indexes:
                index = EncryptedIndex(
                    self.store, self.context, collection=collection,
                    sync_interval=self.settings.index.sync_interval, threads=self.settings.blind_threads,
                )
                index.rebuild()
                self._indexes[collection] = index
            return self._indexes[collection]

    # -- parsing -------------------------------------------------------------------------------------
    def _message(self, body: bytes) -> tuple[dict[str, Any], list[bytes]]:
        try:
            return unpack(body, max_header=MAX_HEADER_BYTES, max_blobs=self.params.dim)
        except WireError as e:
            raise ServiceError(422, "invalid_message", str(e)) from None

    def _check_key(self, collection: str, header: dict[str, Any]) -> str:
        if header.get("params") != self.params.digest:
            raise ServiceError(
                422, "wrong_parameters",
                f"this service uses HE parameters {self.params.digest} (GET /blind/params); "
                "the request names others",
            )
        key_id = header.get("he_key_id")
        if not isinstance(key_id, str) or not 1 <= len(key_id) <= 16:
            raise ServiceError(422, "invalid_message", "he_key_id must be the 16-character key id")
        bound = self.store.bound_key(collection)
        if bound is not None and bound[0] != key_id:
            raise ServiceError(
                409, "wrong_he_key",
                f"this collection is encrypted under HE key id {bound[0]}, not {key_id}",
            )
        return key_id

    def _check_protection(self, header: dict[str, Any]) -> Provenance:
        p = header.get("protection")
        e = self.protection.expected
        if not isinstance(p, dict):
            raise ServiceError(422, "invalid_message", "protection (scheme, scheme_version, key_id) is required")
        if (p.get("scheme"), p.get("scheme_version")) != (e.scheme, e.scheme_version):
            raise ServiceError(422, "wrong_scheme", f"templates must be protected with scheme {e.scheme} v{e.scheme_version}")
        if p.get("key_id") != e.key_id:
            raise ServiceError(422, "wrong_key", f"templates must be protected with key id {e.key_id}")
        if p.get("extractor_name", "dlib") != self.protection.extractor_name:
            raise ServiceError(422, "wrong_extractor", f"templates must come from extractor {self.protection.extractor_name}")
        return Provenance(e.scheme, e.config_digest, e.key_id, self.protection.extractor_name)

    # -- routes --------------------------------------------------------------------------------------
    def describe(self, collection: str) -> dict[str, Any]:
        """What a client needs before encrypting: parameters, the bound key, the next free
        slot, and the protection the templates must carry."""
        bound = self.store.bound_key(collection)
        open_block = self.store.open_block(collection, self.params.slots)
        index = self.index(collection)
        index.sync()  # deletions through /subjects land here
        e = self.protection.expected
        return {
            "params": self.params.as_dict(),
            "he_key_id": bound[0] if bound else None,
            "open_block": {"block": open_block.block_id, "offset": open_block.fill, "capacity": open_block.capacity},
            "template_count": index.size,
            "plain_probes": self.settings.blind_plain_probes,
            "protection": {
                "scheme": e.scheme, "scheme_version": e.scheme_version, "key_id": e.key_id,
                "extractor_name": self.protection.extractor_name,
            },
        }

    def enroll(self, collection: str, body: bytes) -> dict[str, Any]:
        header, blobs = self._message(body)
        key_id = self._check_key(collection, header)
        provenance = self._check_protection(header)
        subjects = header.get("subjects")
        if not isinstance(subjects, list) or not subjects:
            raise ServiceError(422, "invalid_message", "subjects must be a non-empty list")
        if len(subjects) > self.params.slots:
            raise ServiceError(413, "too_many_templates", f"at most {self.params.slots} templates per request")
        try:
            names = [canonical_name(s) for s in subjects]
        except ValueError as err:
            raise ServiceError(422, "invalid_subject", str(err)) from None
        block, offset = header.get("block"), header.get("offset")
        if not (block is None or (isinstance(block, int) and block > 0)) or not isinstance(offset, int):
            raise ServiceError(422, "invalid_message", "block must be null or a block id, offset an integer")
        try:
            columns = self.context.load_all(blobs, "template")
        except CiphertextError as err:
            raise ServiceError(422, "invalid_ciphertext", str(err)) from None

        def merge(old: bytes | None) -> bytes:
            if old is None:
                return self.context.pack_block(columns)
            return self.context.pack_block(self.context.add(self.context.unpack_block(old), columns))

        try:
            block_id, ids = self.store.enroll(
                collection, he_key_id=key_id, params_digest=self.params.digest, capacity=self.params.slots,
                block_id=block, offset=offset, subjects=names, provenance=provenance, merge=merge,
            )
        except (SlotConflict, KeyMismatch) as err:
            raise ServiceError(409, err.code, str(err)) from None
        except BlindError as err:
            raise ServiceError(422, err.code, str(err)) from None
        self.index(collection).catch_up()
        return {
            "block": block_id,
            "templates": [
                {"subject": n, "template_id": i, "slot": offset + s}
                for s, (n, i) in enumerate(zip(names, ids, strict=True))
            ],
        }

    def identify(self, collection: str, body: bytes) -> bytes:
        header, blobs = self._message(body)
        self._check_key(collection, header)
        kind = header.get("probe", "encrypted")
        probe: Any
        if kind == "encrypted":
            try:
                probe = self.context.load_all(blobs, "probe", stored=False)
            except CiphertextError as err:
                raise ServiceError(422, "invalid_ciphertext", str(err)) from None
        elif kind == "plain":
            if not self.settings.blind_plain_probes:
                raise ServiceError(
                    422, "plain_probes_disabled",
                    "this service accepts encrypted probes only (ADVPLUGIN_BLIND_PLAIN_PROBES)",
                )
            probe = self._plain_probe(header.get("values"), blobs)
        else:
            raise ServiceError(422, "invalid_message", "probe must be 'encrypted' or 'plain'")
        try:
            hits = self.index(collection).search(probe)
        except CiphertextError as err:
            raise ServiceError(422, "invalid_probe", str(err)) from None
        out = {
            "params": self.params.digest,
            "blocks": [
                {"block": b.block_id, "slots": b.slots.tolist(), "template_ids": b.template_ids.tolist(),
                 "subjects": b.subjects}
                for b, _ in hits.blocks
            ],
        }
        return pack_message(out, [s for _, s in hits.blocks])

    def _plain_probe(self, values: Any, blobs: list[bytes]) -> np.ndarray:
        if blobs or not isinstance(values, list) or len(values) != self.params.dim:
            raise ServiceError(422, "invalid_probe", f"a plain probe is {self.params.dim} values and no ciphertext")
        try:
            p = np.asarray(values, np.float64)
        except (TypeError, ValueError):
            raise ServiceError(422, "invalid_probe", "probe values must be numbers") from None
        norm = float(np.linalg.norm(p)) if np.isfinite(p).all() else 0.0
        if p.dtype != np.float64 or not norm:
            raise ServiceError(422, "invalid_probe", "probe values must be finite and not all zero")
        return p / norm
