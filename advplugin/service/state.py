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
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from advplugin.gallery import Gallery
from advplugin.gallery.sealing import ErasedError
from advplugin.service.answers import AnswerPolicy
from advplugin.service.auth import ApiKeyAuth
from advplugin.service.blind_service import BlindService
from advplugin.service.collection_service import CollectionService
from advplugin.service.errors import ServiceError
from advplugin.service.extraction import RETRY_AFTER_SECONDS, Extraction
from advplugin.service.protection import ConfigurationError, KeyView, Protection
from advplugin.service.startup import (
    bootstrap_api_key,
    check_gallery_matches,
    key_mismatch_message,
    open_service_gallery,
    warn_key_locations,
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
        #: What answers may reveal, and the budgets (`advplugin.service.answers`).
        self.answers = AnswerPolicy(gallery, protection, collections, settings)
        self._extraction_slots = threading.BoundedSemaphore(settings.max_concurrent_extractions)
        self.extraction = Extraction(protection, settings)
        #: Blind mode only (ADVPLUGIN_MODE=blind): the encrypted collections (docs/blind.md).
        self.blind: BlindService | None = None

    @contextmanager
    def extraction_slot(self) -> Iterator[None]:
        """Admission of one heavy request (image decoding and extraction). Over the cap the
        request is refused at once with 429 and `Retry-After` rather than queued: a queue of
        crafted images would delay every later `/identify` by the whole queue's cost."""
        if not self._extraction_slots.acquire(blocking=False):
            raise ServiceError(
                429, "busy", "too many images are being processed; retry shortly",
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            )
        try:
            yield
        finally:
            self._extraction_slots.release()

    @classmethod
    def start(cls, settings: Settings) -> ServiceState:
        import faiss

        faiss.omp_set_num_threads(max(1, settings.search_threads))
        gallery = open_service_gallery(settings)
        try:
            protection = Protection.from_settings(
                settings, create_key=gallery.templates.is_empty()
            )
            warn_key_locations(settings)
            check_gallery_matches(gallery, protection, settings)
            bootstrap_api_key(gallery, settings)
            collections = CollectionService(gallery, protection, settings)
            AnswerPolicy(gallery, protection, collections, settings)  # refuse an undecidable set-up now
            try:
                collections.open_all()
            except ErasedError as e:  # a restored backup: one clear line, not a traceback
                raise ConfigurationError(str(e)) from None
            if settings.mode != "blind":  # blind templates are not moved by a rename
                collections.complete_subject_renames()
            elif pending := gallery.subject_renames():
                print(f"advplugin: WARNING: {len(pending)} subjects keep names that are not canonical "
                      "(blind mode does not rename them; docs/gallery.md, \"Subject names\")", flush=True)
            blind = BlindService(gallery, protection, settings) if settings.mode == "blind" else None
            state = cls(settings, gallery, protection, collections, ApiKeyAuth(gallery.api_keys))
        except BaseException:
            gallery.close()
            raise
        state.blind = blind
        return state

    def close(self) -> None:
        self.extraction.close()
        self.collections.close()
        self.gallery.close()

    def key_mismatch_message(self, unknown: list[str | None]) -> str:
        return key_mismatch_message(self.protection, self.settings, unknown)


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
