"""`ApiKeyStore`: API keys of the collections, stored as SHA-256 only.

Why a part of its own: authentication needs these four operations and must not be able to
touch templates; a component typed with `ApiKeyStore` gets exactly that. A key is 256
random bits, so a plain SHA-256 suffices (no slow KDF as for passwords); the key itself is
returned once at creation and cannot be recovered from the database.

Every key has a scope (`SCOPES`, least to most rights); creating and revoking a key writes
an audit event in the same transaction (`advplugin.gallery.audit`).

A part of the gallery (`gallery.api_keys`), in the gallery's own database, unlike the
erasure key store (`advplugin.gallery.erasure`), which is kept outside it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update

from advplugin.gallery.audit import CLI, Actor, AuditLog, as_utc
from advplugin.gallery.database import DEFAULT_COLLECTION, Database
from advplugin.gallery.models import ApiKey, Collection, utcnow


class Unset:
    """`configure_api_key`'s "leave this as it is" (None there means "the default")."""


UNSET = Unset()

#: Scopes from least to most rights; each includes the rights of those before it.
SCOPES = ("identify", "enrol", "admin")


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown API-key scope {scope!r}; one of {', '.join(SCOPES)}")
    return scope


def scope_allows(scope: str, needed: str) -> bool:
    """Whether a key of `scope` may do what needs `needed` (unknown scopes: nothing)."""
    return scope in SCOPES and SCOPES.index(scope) >= SCOPES.index(needed)


@dataclass(frozen=True)
class ActiveKey:
    """What authentication needs of an active key (its hash, never the key)."""

    key_sha256: str
    collection: str
    id: int
    scope: str
    #: Answers carry exact similarities (granted by an admin; docs/service.md).
    exact_scores: bool = False
    #: This key's budgets where they differ from the service's defaults (None: the default).
    budget_unmatched: int | None = None
    budget_lookalikes: int | None = None


@dataclass(frozen=True)
class ApiKeyInfo:
    """What `advplugin db api-key list` shows: never the hash."""

    id: int
    collection: str
    name: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None
    exact_scores: bool = False
    budget_unmatched: int | None = None
    budget_lookalikes: int | None = None


def hash_api_key(api_key: str) -> str:
    """What the database stores and what a presented key is compared by."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class ApiKeyStore:
    """API keys of one gallery handle; each key operation writes its audit event in its
    own transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_api_key(
        self, name: str = "default", *, collection: str = DEFAULT_COLLECTION, scope: str = "admin",
        actor: Actor = CLI,
    ) -> str:
        """Create an API key for a collection; returns the key, which is stored only hashed
        (show it once, it cannot be recovered)."""
        api_key = secrets.token_urlsafe(32)
        self.create_api_key_hash(hash_api_key(api_key), name, collection=collection, scope=scope, actor=actor)
        return api_key

    def create_api_key_hash(
        self, key_sha256: str, name: str = "default", *, collection: str = DEFAULT_COLLECTION,
        scope: str = "admin", actor: Actor = CLI,
    ) -> None:
        """Register an API key chosen elsewhere (e.g. ADVPLUGIN_API_KEY) by its SHA-256."""
        check_scope(scope)
        with self.db.transaction() as g:
            cid = g.collection_id(collection)
            g.connection.execute(
                insert(ApiKey).values(
                    collection_id=cid, name=name, key_sha256=key_sha256, scope=scope, created_at=utcnow()
                )
            )
            AuditLog(g).record_audit(actor, "create_api_key", collection=collection, subject=f"{name} ({scope})")

    def active_api_keys(self) -> list[ActiveKey]:
        """Every active API key: hash, collection, row id and scope."""
        k = ApiKey
        q = (
            select(k.key_sha256, Collection.name, k.id, k.scope, k.exact_scores, k.budget_unmatched,
                   k.budget_lookalikes)
            .join(Collection, Collection.id == k.collection_id)
            .where(k.revoked_at.is_(None))
        )
        with self.db.read() as conn:
            return [ActiveKey(h, c, int(i), s, bool(x), bu, bl) for h, c, i, s, x, bu, bl in conn.execute(q)]

    def list_api_keys(self, *, collection: str | None = None) -> list[ApiKeyInfo]:
        """Every key, revoked ones included, oldest first; never their hashes."""
        k = ApiKey
        q = (
            select(k.id, Collection.name, k.name, k.scope, k.created_at, k.revoked_at, k.exact_scores,
                   k.budget_unmatched, k.budget_lookalikes)
            .join(Collection, Collection.id == k.collection_id)
            .order_by(k.id)
        )
        if collection is not None:
            q = q.where(Collection.name == collection)
        with self.db.read() as conn:
            return [
                ApiKeyInfo(int(i), c, n, s, as_utc(cr), as_utc(rv) if rv is not None else None, bool(x), bu, bl)
                for i, c, n, s, cr, rv, x, bu, bl in conn.execute(q)
            ]

    def configure_api_key(
        self, name: str, *, collection: str = DEFAULT_COLLECTION, exact_scores: bool | None = None,
        budget_unmatched: int | Unset | None = UNSET, budget_lookalikes: int | Unset | None = UNSET,
        actor: Actor = CLI,
    ) -> int:
        """Change what the active keys of that name may be told: exact scores (a capability
        an admin grants; off: decisions and bands), and their budgets (None: back to the
        service's default). Audited in the same transaction; returns how many keys changed.
        The service sees the change within seconds (`advplugin.service.auth`)."""
        values: dict[str, object] = {}
        if exact_scores is not None:
            values["exact_scores"] = bool(exact_scores)
        for column, value in (("budget_unmatched", budget_unmatched), ("budget_lookalikes", budget_lookalikes)):
            if not isinstance(value, Unset):
                if value is not None and (not isinstance(value, int) or value < 0):
                    raise ValueError(f"{column} must be a whole number >= 0 (or None for the default)")
                values[column] = value
        if not values:
            raise ValueError("nothing to change: give exact_scores or a budget")
        with self.db.transaction() as g:
            cid = g.collection_id(collection)
            result = g.connection.execute(
                update(ApiKey)
                .where(ApiKey.collection_id == cid, ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(**values)
            )
            n = int(result.rowcount or 0)
            if n:
                what = ", ".join(f"{k}={v}" for k, v in values.items())
                AuditLog(g).record_audit(actor, "set_api_key", collection=collection, subject=f"{name}: {what}"[:255])
        return n

    def api_key_hashes(self) -> list[tuple[str, str]]:
        """(sha256 hex, collection name) of every active API key."""
        q = (
            select(ApiKey.key_sha256, Collection.name)
            .join(Collection, Collection.id == ApiKey.collection_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        with self.db.read() as conn:
            return [(h, c) for h, c in conn.execute(q)]

    def revoke_api_keys(
        self, name: str, *, collection: str = DEFAULT_COLLECTION, actor: Actor = CLI
    ) -> int:
        """Revoke every active key of that name in the collection; returns how many."""
        with self.db.transaction() as g:
            cid = g.collection_id(collection)
            result = g.connection.execute(
                update(ApiKey)
                .where(ApiKey.collection_id == cid, ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            n = int(result.rowcount or 0)
            if n:
                AuditLog(g).record_audit(actor, "revoke_api_key", collection=collection, subject=name, template_count=None)
        return n
