"""API-key authentication: which collection a request's key belongs to.

Depends only on the gallery's API-key store. Keys are stored hashed; every stored hash is
compared in constant time with no early exit, so timing reveals neither which key nor how
much of one matched. The hashes are cached and re-read every few seconds, so revocations
take effect within seconds without a query per request.

`caller` says who the key is (collection, the key's row id for the audit trail, its scope);
what a scope may do is decided by the route dependencies (`advplugin.service.deps`).
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import NamedTuple

from advplugin.gallery.apikeys import ActiveKey, ApiKeyStore, hash_api_key

#: Longest API key looked at: longer ones are refused without hashing (bounded input).
MAX_API_KEY_LENGTH = 256
_RELOAD_EVERY = 5.0  # seconds: how stale a revocation may be
_RELOAD_MISS_AFTER = 1.0  # seconds: an unknown key re-reads the store at most this often


class Caller(NamedTuple):
    """An authenticated request's key: its collection, row id (never the key), scope, and
    what its answers may carry (`advplugin.service.answers`): exact scores or decisions, and
    its own budgets (None: the service's defaults)."""

    collection: str
    api_key_id: int
    scope: str
    exact_scores: bool = False
    budget_unmatched: int | None = None
    budget_lookalikes: int | None = None


class Stale:
    """`ApiKeyAuth.cached_caller`'s answer when only a re-read of the key store can tell."""


STALE = Stale()


class ApiKeyAuth:
    def __init__(self, store: ApiKeyStore) -> None:
        self.store = store
        self._hashes: list[ActiveKey] = []
        self._loaded = 0.0
        self._lock = threading.Lock()

    def caller(self, api_key: str | None) -> Caller | None:
        """Collection, key id and scope of a valid API key, else None (may read the store)."""
        found = self.cached_caller(api_key)
        if isinstance(found, Stale):
            self._reload()
            found = self._match(hash_api_key(api_key or "").encode())
        return found

    def cached_caller(self, api_key: str | None) -> Caller | Stale | None:
        """`caller` from the hashes in memory, never SQL: `STALE` when the answer needs the
        store re-read (every `_RELOAD_EVERY` s, so a revocation takes effect; or an unknown key
        once `_RELOAD_MISS_AFTER` s have passed, so a new key works at once). Why: the service
        asks on the event loop, where a database read must not run."""
        if not api_key or len(api_key) > MAX_API_KEY_LENGTH:
            return None
        age = time.monotonic() - self._loaded
        if age > _RELOAD_EVERY:
            return STALE
        found = self._match(hash_api_key(api_key).encode())
        if found is None and age > _RELOAD_MISS_AFTER:  # a key created since the last load
            return STALE
        return found

    def _reload(self) -> None:
        hashes = self.store.active_api_keys()
        with self._lock:
            self._hashes, self._loaded = hashes, time.monotonic()

    def _match(self, digest: bytes) -> Caller | None:
        found = None
        for key in self._hashes:
            if hmac.compare_digest(key.key_sha256.encode(), digest):
                found = Caller(key.collection, key.id, key.scope, key.exact_scores, key.budget_unmatched,
                               key.budget_lookalikes)
        return found
