"""`Gallery`: data access to the protected-template database (SQLite or PostgreSQL).

`Gallery` is the composition of the gallery's rooms over one engine; each room is its own
module, documented there, and can be depended on alone:

* `advplugin.gallery.database`: `Database` (engine, serialised write transactions,
  `transaction()`, collections), `make_engine`, `DEFAULT_COLLECTION`;
* `advplugin.gallery.changelog`: `ChangeLog`, the `template_changes` outbox the FAISS index
  replays (`last_change_seq`, `changes_since`, `key_ids_changed`), `Change`;
* `advplugin.gallery.templates`: `TemplateRepository` (extends `ChangeLog`: every template
  write logs itself), `TemplateBatch`, `StoredTemplate`, `SubjectInfo`, `SubjectNotFound`;
* `advplugin.gallery.apikeys`: `ApiKeyStore` (extends `AuditLog`: key operations audit
  themselves), `hash_api_key`, `SCOPES`;
* `advplugin.gallery.audit`: `AuditLog` (`record_audit` in the caller's transaction,
  `audit_events`), `Actor`.

So an authentication component can be typed with `ApiKeyStore`, the index follower with
`TemplateRepository` (template reads + the change log), and both receive the same `Gallery`.
This module keeps the names it always exported, so `from advplugin.gallery.store import X`
keeps working.
"""

from __future__ import annotations

from advplugin.gallery.apikeys import ApiKeyStore, hash_api_key
from advplugin.gallery.changelog import Change, ChangeLog
from advplugin.gallery.database import DEFAULT_COLLECTION, Database, make_engine
from advplugin.gallery.templates import (
    StoredTemplate,
    SubjectInfo,
    SubjectNotFound,
    TemplateBatch,
    TemplateRepository,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "ApiKeyStore",
    "Change",
    "ChangeLog",
    "Database",
    "Gallery",
    "StoredTemplate",
    "SubjectInfo",
    "SubjectNotFound",
    "TemplateBatch",
    "TemplateRepository",
    "hash_api_key",
    "make_engine",
]


class Gallery(TemplateRepository, ApiKeyStore):
    """The gallery database: templates, subjects, the change log, API keys and collections.
    Open with `Gallery.open(url)`; thread-safe (one engine, a connection per call)."""
