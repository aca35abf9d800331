"""The encrypted index of a blind collection (docs/blind.md): CKKS ciphertext blocks in memory,
kept in step with SQL (`blind_store`), searched with an encrypted (or plaintext) probe into
encrypted scores. The blind counterpart of `index.TemplateIndex`, beside it rather than among
the pluggable `backends/`, because it is not one.

Why not an `IndexBackend`: that contract is plaintext by design (float32 vectors in, cosine
scores out, `vectors(ids)` to re-score), and an index that could honour it would hold
matchable templates. The encrypted index keeps the same consistency model instead: SQL is the
truth, the index is a cache that follows it (block versions for the ciphertexts, a (count,
max id) stamp for the slot map, which also catches subject deletions cascading in SQL) and
can always be rebuilt from it. It holds ciphertexts, block ids, slots, template ids and
subject names: nothing that decrypts, and no plaintext template or score ever.

Search cost is linear in blocks: each block is `dim` ciphertext products (docs/blind.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from advplugin.gallery.blind_store import BlindStore, BlockLayout
from advplugin.he import ServerContext


@dataclass(frozen=True)
class EncryptedHits:
    """The answer for one probe: per block, the encrypted scores and its live slots."""

    blocks: list[tuple[BlockLayout, bytes]]


class EncryptedIndex:
    """The encrypted blocks of one blind collection. Thread-safe (one lock; the ciphertext
    products run outside it on an immutable view of the blocks)."""

    def __init__(
        self, store: BlindStore, context: ServerContext, *, collection: str,
        sync_interval: float = 0.05, threads: int = 1,
    ) -> None:
        self.store = store
        self.context = context
        self.collection = collection
        self.sync_interval = sync_interval
        self.threads = threads
        self._lock = threading.Lock()
        self._blocks: dict[int, tuple[int, list[ts.CKKSVector]]] = {}  # id -> (version, columns)
        self._layout: dict[int, BlockLayout] = {}
        self._stamp: tuple[int, int] | None = None
        self._synced = -float("inf")

    def rebuild(self) -> None:
        """Drop everything and read it again from SQL."""
        with self._lock:
            self._blocks.clear()
            self._stamp = None
            self._catch_up_locked()

    def catch_up(self) -> None:
        with self._lock:
            self._catch_up_locked()

    def sync(self) -> None:
        with self._lock:
            if time.monotonic() - self._synced >= self.sync_interval:
                self._catch_up_locked()

    def _catch_up_locked(self) -> None:
        self._synced = time.monotonic()
        versions = self.store.block_versions(self.collection)
        for bid in [b for b in self._blocks if b not in versions]:
            del self._blocks[bid]
        for bid, version in versions.items():
            held = self._blocks.get(bid)
            if held is None or held[0] != version:
                row = self.store.block_data(bid)
                if row is not None:
                    self._blocks[bid] = (row[0], self.context.unpack_block(row[1]))
        stamp = self.store.layout_stamp(self.collection)
        if stamp != self._stamp:
            self._layout = self.store.layout(self.collection)
            self._stamp = stamp

    @property
    def size(self) -> int:
        """Live templates."""
        with self._lock:
            return sum(len(b.slots) for b in self._layout.values())

    def search(self, probe: list[ts.CKKSVector] | np.ndarray) -> EncryptedHits:
        """Encrypted scores of every block with live templates (a block whose templates were
        all deleted is skipped: its scores would tell the client nothing)."""
        self.sync()
        with self._lock:
            work = [
                (self._layout[bid], columns) for bid, (_, columns) in sorted(self._blocks.items())
                if bid in self._layout and len(self._layout[bid].slots)
            ]
        scores = self.context.score_blocks([c for _, c in work], probe, threads=self.threads)
        return EncryptedHits([(layout, s) for (layout, _), s in zip(work, scores, strict=True)])
