"""Protected-template gallery: SQL storage (the truth), FAISS index (a cache), matcher.

`Gallery` (`advplugin.gallery.store`) is composed of parts over one database handle
(`Database`): the sealing keys, the vector codec, the change log, subjects, templates, the
erasure outbox, the sealing jobs, the audit trail and API keys; depend on the part a
component needs (`gallery.api_keys`, `gallery.changes`, ...). docs/architecture.md draws them.
"""

from advplugin.gallery.apikeys import hash_api_key
from advplugin.gallery.changelog import Change
from advplugin.gallery.database import DEFAULT_COLLECTION, Database, make_engine
from advplugin.gallery.schema import NotMigratedError, check_migrated, upgrade
from advplugin.gallery.store import Gallery
from advplugin.gallery.subjects import SubjectInfo, SubjectNotFound
from advplugin.gallery.templates import StoredTemplate, TemplateBatch

__all__ = [
    "DEFAULT_COLLECTION",
    "Change",
    "Database",
    "Gallery",
    "NotMigratedError",
    "StoredTemplate",
    "SubjectInfo",
    "SubjectNotFound",
    "TemplateBatch",
    "check_migrated",
    "hash_api_key",
    "make_engine",
    "upgrade",
]
