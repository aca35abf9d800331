"""`VectorCodec`: the one place template vectors are encoded for storage and decoded.

Why a part of its own: every read and write of a vector (enrolment, key rotation, sealing
jobs, index rebuilds, matching) must seal and open it the same way: plaintext float32 in an
unsealed gallery, else AES-256-GCM under its subject's key, bound to the row's id and
provenance (`advplugin.gallery.sealing`). It never logs or echoes vector values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from advplugin.gallery.models import Subject, Template
from advplugin.gallery.seal_state import SealKeys
from advplugin.gallery.sealing import Sealer, TamperedError, sealed_size, template_ad

IN_CHUNK = 500  # ids per IN (...) clause, well under every driver's parameter limit


class SealedSubject(NamedTuple):
    """A subject as a write needs it: its id and its sealed key (None: unsealed gallery),
    and for a subject made by this write its template cipher (no unwrap, no store lookup)."""

    id: int
    key: bytes | None
    cipher: Any = None


def chunks(seq: Sequence, n: int = IN_CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class VectorCodec:
    """Encodes and decodes the vectors of one gallery handle with its sealers (`SealKeys`)."""

    def __init__(self, seal: SealKeys) -> None:
        self.seal = seal

    def encode(
        self, sealer: Sealer | None, cid: int, ids: Sequence[int], subjects: Sequence[tuple[str, SealedSubject]],
        vectors: np.ndarray, *, scheme: Sequence[str], scheme_version: Sequence[int],
        config_digest: Sequence[str], key_id: Sequence[str | None],
    ) -> list[bytes]:
        """Stored bytes of each row (see `encode_rows`)."""
        packed = self.encode_rows(
            sealer, cid, ids, subjects, vectors, scheme=scheme, scheme_version=scheme_version,
            config_digest=config_digest, key_id=key_id,
        )
        return [r.tobytes() for r in packed]

    def encode_rows(
        self, sealer: Sealer | None, cid: int, ids: Sequence[int], subjects: Sequence[tuple[str, SealedSubject]],
        vectors: np.ndarray, *, scheme: Sequence[str], scheme_version: Sequence[int],
        config_digest: Sequence[str], key_id: Sequence[str | None],
    ) -> np.ndarray:
        """Stored bytes of the rows as ONE uint8 [n, width] array (every row of a write has one
        width; a bulk insert ships it as is): plaintext float32 in an unsealed gallery, else
        sealed under its subject's key and bound to the row's id and provenance. Ciphers of
        existing subjects are looked up together (cached only for small writes: a bulk
        migration must not fill the sealer's cache)."""
        if sealer is None:
            return np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8)
        dim = vectors.shape[1]
        lookup = list({(cid, name, s.key) for name, s in subjects if s.cipher is None})
        by_item = sealer.subject_ciphers(lookup, cache=len(lookup) <= IN_CHUNK) if lookup else {}  # type: ignore[arg-type]
        ciphers = [s.cipher if s.cipher is not None else by_item[cid, name, s.key] for name, s in subjects]  # type: ignore[index]
        ads = [
            template_ad(cid, t, s, v, d, k, dim)
            for t, s, v, d, k in zip(ids, scheme, scheme_version, config_digest, key_id, strict=True)
        ]
        return sealer.seal_vectors(ciphers, ads, vectors)

    def decode(self, rows: Sequence) -> list[np.ndarray]:  # type: ignore[type-arg]
        """Vectors of rows carrying (id, collection_id, name, sealed_key, vector, dim, scheme,
        scheme_version, config_digest, key_id). A sealed row failing authentication raises
        `TamperedError` naming the template; a plaintext row in a gallery sealed to the end
        is refused the same way (someone wrote it around the gallery)."""
        out = []
        refuse_plain = self.seal.state.sealed and not self.seal.state.converting
        ciphers = self.row_ciphers(rows)
        for r in rows:
            # Positional unpacking: attribute access on rows cost more than the decryption.
            tid, cid, name, skey, blob, dim, scheme, version, digest, kid = r[:10]
            if len(blob) == 4 * dim:
                if refuse_plain:
                    raise TamperedError(f"template {tid} is stored unsealed in a sealed gallery (written around it?)")
                out.append(np.frombuffer(blob, dtype="<f4"))
                continue
            if len(blob) != sealed_size(dim):
                raise ValueError(f"stored template {tid} has {len(blob)} bytes, its row says dim={dim}")
            if skey is None:
                raise TamperedError(f"template {tid} is sealed but its subject has no key")
            ad = template_ad(cid, tid, scheme, version, digest, kid, dim)
            out.append(np.frombuffer(Sealer.open_vector(ciphers[cid, name, skey], ad, blob, tid), dtype="<f4"))
        return out

    def row_ciphers(self, rows: Sequence) -> dict[tuple[int, str, bytes], Any]:  # type: ignore[type-arg]
        """The subject ciphers of the sealed rows among `rows`, all at once (one erasure-store
        query). Small reads (search candidates, catch-up) share the sealer's cache; bulk
        reads (an index rebuild) keep theirs for the call only."""
        items = {(r[1], r[2], r[3]) for r in rows if r[3] is not None and len(r[4]) != 4 * r[5]}
        if not items:
            return {}
        sealer = self.seal.read_sealer()
        if any(Sealer.subject_key_serial(k) not in sealer.serials for _, _, k in items):
            sealer = self.seal.read_sealer(refresh=True)  # re-keyed by another process
        return sealer.subject_ciphers(list(items), cache=len(rows) <= IN_CHUNK)  # type: ignore[return-value]

    def vector_columns(self) -> tuple:  # type: ignore[type-arg]
        """What `decode` needs of a row (templates joined with subjects)."""
        return (
            Template.id, Template.collection_id, Subject.name, Subject.sealed_key, Template.vector,
            Template.dim, Template.scheme, Template.scheme_version, Template.config_digest,
            Template.key_id,
        )
