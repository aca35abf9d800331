"""Protected-template gallery: SQL storage (the truth), FAISS index (a cache), matcher.

`Gallery` (`advplugin.gallery.store`) combines the storage rooms: `Database` (engine,
transactions, collections), `ChangeLog` (the index's outbox), `TemplateRepository`
(templates, subjects, provenance) and `ApiKeyStore` (hashed API keys); depend on the
narrowest one a component needs.
"""

from advplugin.gallery.apikeys import ApiKeyStore, hash_api_key
from advplugin.gallery.changelog import Change, ChangeLog
from advplugin.gallery.database import DEFAULT_COLLECTION, Database, make_engine
from advplugin.gallery.schema import NotMigratedError, check_migrated, upgrade
from advplugin.gallery.store import Gallery
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
    "NotMigratedError",
    "StoredTemplate",
    "SubjectInfo",
    "SubjectNotFound",
    "TemplateBatch",
    "TemplateRepository",
    "check_migrated",
    "hash_api_key",
    "make_engine",
    "upgrade",
]
