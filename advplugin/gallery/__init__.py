"""Protected-template gallery: SQL storage (the truth), FAISS index (a cache), matcher."""

from advplugin.gallery.schema import NotMigratedError, check_migrated, upgrade
from advplugin.gallery.store import (
    DEFAULT_COLLECTION,
    Change,
    Gallery,
    StoredTemplate,
    SubjectInfo,
    SubjectNotFound,
    TemplateBatch,
    make_engine,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "Change",
    "Gallery",
    "NotMigratedError",
    "StoredTemplate",
    "SubjectInfo",
    "SubjectNotFound",
    "TemplateBatch",
    "check_migrated",
    "make_engine",
    "upgrade",
]
