"""Pluggable search backends of the gallery index. Importing this package registers every
built-in backend (like `advplugin.protectors` does for schemes)."""

from advplugin.gallery.backends import (  # noqa: F401  (registration side effect)
    faiss_backends,
    milvus_backend,  # pymilvus is imported only when a milvus backend is created
)
from advplugin.gallery.backends.base import (
    INDEX_BACKENDS,
    Batch,
    IndexBackend,
    create_index_backend,
    index_backend_class,
    list_index_backends,
    register_index_backend,
)
from advplugin.gallery.backends.config import SHORT_NAMES, IndexConfig

__all__ = [
    "INDEX_BACKENDS",
    "SHORT_NAMES",
    "Batch",
    "IndexBackend",
    "IndexConfig",
    "create_index_backend",
    "index_backend_class",
    "list_index_backends",
    "register_index_backend",
]
