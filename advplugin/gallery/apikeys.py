"""`ApiKeyStore`: API keys of the collections, stored as SHA-256 only.

Why a room of its own: authentication needs these four operations and must not be able to
touch templates; a component typed with `ApiKeyStore` gets exactly that. A key is 256
random bits, so a plain SHA-256 suffices (no slow KDF as for passwords); the key itself is
returned once at creation and cannot be recovered from the database.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import insert, select, update

from advplugin.gallery.database import DEFAULT_COLLECTION, Database
from advplugin.gallery.models import ApiKey, Collection, utcnow


def hash_api_key(api_key: str) -> str:
    """What the database stores and what a presented key is compared by."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class ApiKeyStore(Database):
    def create_api_key(self, name: str = "default", *, collection: str = DEFAULT_COLLECTION) -> str:
        """Create an API key for a collection; returns the key, which is stored only hashed
        (show it once, it cannot be recovered)."""
        api_key = secrets.token_urlsafe(32)
        self.create_api_key_hash(hash_api_key(api_key), name, collection=collection)
        return api_key

    def create_api_key_hash(
        self, key_sha256: str, name: str = "default", *, collection: str = DEFAULT_COLLECTION
    ) -> None:
        """Register an API key chosen elsewhere (e.g. ADVPLUGIN_API_KEY) by its SHA-256."""
        cid = self.collection_id(collection)
        with self._write() as conn:
            conn.execute(
                insert(ApiKey).values(
                    collection_id=cid, name=name, key_sha256=key_sha256, created_at=utcnow()
                )
            )

    def api_key_hashes(self) -> list[tuple[str, str]]:
        """(sha256 hex, collection name) of every active API key."""
        q = (
            select(ApiKey.key_sha256, Collection.name)
            .join(Collection, Collection.id == ApiKey.collection_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        with self._read() as conn:
            return [(h, c) for h, c in conn.execute(q)]

    def revoke_api_keys(self, name: str, *, collection: str = DEFAULT_COLLECTION) -> int:
        """Revoke every active key of that name in the collection; returns how many."""
        cid = self.collection_id(collection)
        with self._write() as conn:
            result = conn.execute(
                update(ApiKey)
                .where(ApiKey.collection_id == cid, ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return int(result.rowcount or 0)
