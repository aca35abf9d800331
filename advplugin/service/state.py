"""Everything the service holds while running, built once at start by `ServiceState.start`.

Four parts, each in its own module, so that a route depends on what it uses:
- `protection` (`Protection`): the scheme, its scorer, and in images mode the extractor and
  key(s); refuses unsafe configurations;
- `collections` (`CollectionService`): writes, the index of each collection that follows
  them, key-rotation watching, matching;
- `auth` (`ApiKeyAuth`): API key -> collection, in constant time;
- start-up checks (`startup`): the gallery must match what this service protects with.
"""

from __future__ import annotations

import hashlib

from advplugin.gallery.store import Gallery
from advplugin.service.auth import ApiKeyAuth
from advplugin.service.collection_service import CollectionService
from advplugin.service.protection import ConfigurationError, KeyView, Protection
from advplugin.service.startup import (
    bootstrap_api_key,
    check_gallery_matches,
    key_mismatch_message,
    open_gallery,
)
from advplugin.settings import Settings

__all__ = ["ConfigurationError", "KeyView", "ServiceState", "image_sha256"]


class ServiceState:
    def __init__(
        self,
        settings: Settings,
        gallery: Gallery,
        protection: Protection,
        collections: CollectionService,
        auth: ApiKeyAuth,
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self.protection = protection
        self.collections = collections
        self.auth = auth

    @classmethod
    def start(cls, settings: Settings) -> ServiceState:
        import faiss

        faiss.omp_set_num_threads(max(1, settings.search_threads))
        gallery = open_gallery(settings)
        try:
            protection = Protection.from_settings(settings)
            check_gallery_matches(gallery, protection, settings)
            bootstrap_api_key(gallery, settings)
            collections = CollectionService(gallery, protection, settings)
            collections.open_all()
        except BaseException:
            gallery.close()
            raise
        return cls(settings, gallery, protection, collections, ApiKeyAuth(gallery))

    def close(self) -> None:
        self.collections.close()
        self.gallery.close()

    def key_mismatch_message(self, unknown: list[str | None]) -> str:
        return key_mismatch_message(self.protection, self.settings, unknown)


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
