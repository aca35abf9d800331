"""Image requests: decode, detect, embed and protect, in the serving process behind one lock
or in a pool of worker processes that uses every core.

Why processes, not threads: dlib holds the GIL while it detects and embeds. Measured on 2
cores, two threads with an extractor each took 1.97 s for 20 LFW images against 2.07 s for
one thread, so a thread per core gains nothing; a process per core does.

Why a worker protects as well as extracts: the raw embedding never leaves the process that
computed it. Only boxes, landmarks, scores and protected templates cross the pipe back; the
worker holds the same key file(s) as the service (read from the same settings).

A worker that dies (killed for memory, a native crash) breaks the pool: the pool is rebuilt
and that request answered 503 with Retry-After, so one bad image cannot take the image
endpoints down for good.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from advplugin.adapters import Detections
from advplugin.gallery.matcher import ProbeSet
from advplugin.images import load_image
from advplugin.service.errors import ServiceError
from advplugin.service.logs import configure_logging
from advplugin.service.protection import KeyView, Protection
from advplugin.settings import Settings

log = logging.getLogger("advplugin.service")

#: What a 429 or 503 of an image request tells the client to wait, in seconds.
RETRY_AFTER_SECONDS = 1


class Extraction:
    """Faces of an image, protected under the keys of a `KeyView`: in process behind
    `protection.extract_lock` (`workers` 0), or in `workers` worker processes."""

    def __init__(self, protection: Protection, settings: Settings) -> None:
        self.protection = protection
        self.settings = settings
        self.workers = settings.extraction_workers if protection.extractor is not None else 0
        self._pool_lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        if self.workers:
            self._pool = self._start_pool()
        elif protection.extractor is not None:
            _warm(protection)

    def _start_pool(self) -> ProcessPoolExecutor:
        # spawn: forking a process that runs threads (uvicorn's, FAISS's) is unsafe.
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.settings, logging.getLogger().getEffectiveLevel()),
        )
        for _ in range(self.workers):  # start them now: the models load before the first image
            pool.submit(_ready)
        return pool

    def faces(
        self, data: bytes, view: KeyView, *, largest_only: bool, max_faces: int
    ) -> tuple[Detections, ProbeSet]:
        """Detections and their protected templates; no templates when no face was found.
        Raises `ImageError` for an unusable image."""
        max_pixels = self.settings.max_pixels
        previous = view.previous.metadata.key_id if view.previous is not None else None
        pool = self._pool
        if pool is None:
            return _extract_and_protect(
                self.protection, data, previous, max_pixels, max_faces, largest_only, lock=True
            )
        try:
            return pool.submit(_work, data, previous, max_pixels, max_faces, largest_only).result()
        except BrokenProcessPool:
            log.error("an extraction worker died; restarting the pool")
            with self._pool_lock:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start_pool()
            raise ServiceError(
                503, "extractor_restarting", "the image could not be processed; retry shortly",
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            ) from None

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def _extract_and_protect(
    protection: Protection, data: bytes, previous_key_id: str | None, max_pixels: int,
    max_faces: int, largest_only: bool, *, lock: bool,
) -> tuple[Detections, ProbeSet]:
    """The one implementation of both modes: decode, extract, protect; the raw embeddings
    never leave this function."""
    extractor = protection.extractor
    assert extractor is not None
    image = load_image(data, max_pixels=max_pixels)
    if lock:  # native extractors are not thread-safe; a worker process runs one at a time
        with protection.extract_lock:
            faces = extractor.extract(image, max_faces=max_faces, largest_only=largest_only)
    else:
        faces = extractor.extract(image, max_faces=max_faces, largest_only=largest_only)
    if len(faces.detections) == 0:
        return faces.detections, {}
    previous = protection.previous
    if previous is None or previous.metadata.key_id != previous_key_id:
        previous = None
    view = KeyView(current=protection.expected.key_id, previous=previous, unknown=[])
    return faces.detections, protection.protect_for(view, faces.embeddings)


# -- worker processes --------------------------------------------------------------------------
_worker: Protection | None = None


def _warm(protection: Protection) -> None:
    """Build the protectors' cached transforms before the first image, not during it: for
    `xnn` at 128-d the key-derived matrix and its QR took ~0.6 s on a busy 2-core machine,
    20 % of a profiled run of image requests (benchmarks/http_load.py)."""
    for protector in (protection.protector, protection.previous):
        if protector is not None:
            protector.protect(np.ones((1, protector.dim), np.float32))


def _init_worker(settings: Settings, log_level: int) -> None:
    """A worker's start: the service's log format and level first (a spawned process starts
    with Python's defaults, which printed its warnings, Pillow's among them, as plain text
    into a JSON log), then its own protection and extractor."""
    global _worker
    configure_logging(log_level, settings.log_format)
    _worker = Protection.from_settings(settings)
    if _worker.extractor is not None:
        _warm(_worker)


def _ready() -> bool:
    return _worker is not None


def _work(
    data: bytes, previous_key_id: str | None, max_pixels: int, max_faces: int, largest_only: bool
) -> tuple[Detections, ProbeSet]:
    assert _worker is not None
    detections, probes = _extract_and_protect(
        _worker, data, previous_key_id, max_pixels, max_faces, largest_only, lock=False
    )
    return detections, {k: np.ascontiguousarray(v, np.float32) for k, v in probes.items()}
