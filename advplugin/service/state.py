"""Everything the service holds while running: gallery, protector (images mode), extractor,
one FAISS index per collection, API-key hashes. Built once at start by `ServiceState.start`,
which also enforces the embedded defaults and refuses unsafe or inconsistent configurations.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from advplugin.gallery.index import IndexConfig, TemplateIndex
from advplugin.gallery.matcher import Matcher, ScoreFn, cosine_score
from advplugin.gallery.store import Gallery, hash_api_key
from advplugin.keys import load_key, write_key
from advplugin.protectors import SCHEMES, Protector, ProtectorMetadata, create_protector
from advplugin.settings import Settings

log = logging.getLogger("advplugin.service")


class ConfigurationError(RuntimeError):
    """The service cannot start with this configuration; the message says how to fix it."""


def _write_secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gallery: Gallery
        self.protector: Protector | None = None
        self.extractor = None  # advplugin.adapters.Extractor in images mode
        self.expected: ProtectorMetadata
        self.extractor_name: str
        self.extractor_version: str
        self.score: ScoreFn
        self._indexes: dict[str, TemplateIndex] = {}
        self._lock = threading.Lock()
        self.extract_lock = threading.Lock()  # native extractors are not thread-safe
        self._api_keys: list[tuple[str, str]] = []
        self._api_keys_loaded = 0.0

    # -- start / stop ------------------------------------------------------------------------------
    @classmethod
    def start(cls, settings: Settings) -> ServiceState:
        import faiss

        faiss.omp_set_num_threads(max(1, settings.search_threads))
        state = cls(settings)
        state._open_gallery()
        try:
            state._setup_protection()
            state._check_gallery_matches()
            state._bootstrap_api_key()
            for name in state.gallery.collections():
                state.index(name)
        except BaseException:
            state.gallery.close()
            raise
        return state

    def _open_gallery(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        url = s.resolved_database_url
        # Embedded default only: a brand-new SQLite file in the data folder is created and
        # migrated. An existing database is never migrated implicitly.
        fresh = s.database_url is None and not (s.data_dir / "gallery.db").exists()
        self.gallery = Gallery.open(url, upgrade=fresh)

    def _setup_protection(self) -> None:
        s = self.settings
        scheme = s.resolved_scheme
        if scheme not in SCHEMES:
            raise ConfigurationError(f"unknown scheme {scheme!r}; available: {', '.join(SCHEMES.names())}")
        if s.mode == "images":
            from advplugin.adapters import create_extractor

            self.extractor = create_extractor(s.extractor)
            key_file = s.resolved_key_file
            if not key_file.exists():
                key = write_key(key_file)
                print(f"advplugin: created key file {key_file} (key id {key.key_id}); back it up", flush=True)
            protector = create_protector(scheme, key=load_key(key_file), dim=self.extractor.dim)
            if not protector.protects and not s.allow_unprotected:
                raise ConfigurationError(
                    f"scheme {scheme!r} stores raw embeddings; set ADVPLUGIN_ALLOW_UNPROTECTED=1 "
                    "only for a baseline measurement"
                )
            self.protector = protector
            self.expected = protector.metadata
            self.extractor_name, self.extractor_version = self.extractor.name, self.extractor.version
            self.score = protector.score
        else:
            if scheme == "none" and not s.allow_unprotected:
                raise ConfigurationError("scheme 'none' stores raw embeddings; refused")
            if not s.template_key_id and scheme != "none":
                raise ConfigurationError(
                    "template mode needs ADVPLUGIN_TEMPLATE_KEY_ID (the key id of the clients' key)"
                )
            version = self._scheme_version(scheme)
            self.expected = ProtectorMetadata(
                scheme=scheme, scheme_version=version, key_id=s.template_key_id,
                input_dim=s.template_dim, output_dim=s.template_dim,
            )
            self.extractor_name, self.extractor_version = s.template_extractor, "client"
            self.score = cosine_score(s.template_dim)

    @staticmethod
    def _scheme_version(scheme: str) -> int:
        """A scheme's version without its key: build it with a throwaway key."""
        from advplugin.keys import Key

        return create_protector(scheme, key=Key.generate(), dim=8).scheme_version

    def _check_gallery_matches(self) -> None:
        """Refuse to serve a gallery whose templates were made by another scheme or key:
        scores between them would be meaningless (finish the key rotation first)."""
        e = self.expected
        for row in self.gallery.provenance(collection=None):
            if (row["scheme"], row["scheme_version"], row["key_id"], row["dim"]) != (
                e.scheme, e.scheme_version, e.key_id, e.output_dim
            ):
                raise ConfigurationError(
                    f"the gallery holds {row['count']} templates of scheme {row['scheme']} "
                    f"v{row['scheme_version']}, key id {row['key_id']}, dim {row['dim']}, but this "
                    f"service protects with {e.scheme} v{e.scheme_version}, key id {e.key_id}, "
                    f"dim {e.output_dim}; use the matching key file or finish the key rotation"
                )

    def _bootstrap_api_key(self) -> None:
        s = self.settings
        if self.gallery.api_key_hashes():
            return
        if s.api_key is not None:
            self.gallery.create_api_key_hash(hash_api_key(s.api_key.get_secret_value()), "bootstrap")
            return
        api_key = self.gallery.create_api_key("bootstrap")
        path = s.data_dir / "api-key"
        if path.exists():
            path.unlink()
        _write_secret_file(path, api_key)
        print(f"advplugin: created an API key, stored hashed; the key is in {path} (mode 0600)", flush=True)

    def close(self) -> None:
        for index in self._indexes.values():
            try:
                index.save()
            except OSError as e:
                log.warning("could not write index snapshot: %s", type(e).__name__)
        self.gallery.close()

    # -- indexes ---------------------------------------------------------------------------------
    def index(self, collection: str) -> TemplateIndex:
        with self._lock:
            if collection not in self._indexes:
                s = self.settings
                cid = self.gallery.collection_id(collection)
                index = TemplateIndex(
                    self.gallery, self.expected.output_dim, collection=collection,
                    config=IndexConfig(
                        kind=s.index_kind, ivf_nlist=s.ivf_nlist, ivf_nprobe=s.ivf_nprobe,
                        hnsw_m=s.hnsw_m, hnsw_ef_search=s.hnsw_ef_search, use_gpu=s.use_gpu,
                        sync_interval=s.index_sync_interval,
                    ),
                    snapshot_path=s.resolved_index_dir / f"collection-{cid}-{s.index_kind}.npz",
                )
                index.load()
                index.save()
                self._indexes[collection] = index
            return self._indexes[collection]

    def matcher(self, collection: str) -> Matcher:
        return Matcher(self.gallery, self.index(collection), self.score, collection=collection)

    def after_write(self, collection: str) -> None:
        """Bring the index up to date with what was just committed, snapshot now and then."""
        index = self.index(collection)
        index.catch_up()
        index.maybe_save(self.settings.snapshot_every)

    # -- API keys --------------------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> str | None:
        """The collection of a valid API key, else None. Every stored hash is compared in
        constant time (no early exit), so timing reveals neither which key nor how much
        of one matched."""
        if not api_key or len(api_key) > 256:
            return None
        digest = hash_api_key(api_key).encode()
        age = time.monotonic() - self._api_keys_loaded
        if age > 5.0:  # revocations take effect within seconds
            self._reload_api_keys()
        found = self._match(digest)
        if found is None and age > 1.0:  # a key created since the last load
            self._reload_api_keys()
            found = self._match(digest)
        return found

    def _reload_api_keys(self) -> None:
        self._api_keys = self.gallery.api_key_hashes()
        self._api_keys_loaded = time.monotonic()

    def _match(self, digest: bytes) -> str | None:
        found = None
        for stored, collection in self._api_keys:
            if hmac.compare_digest(stored.encode(), digest):
                found = collection
        return found

    # -- protection ------------------------------------------------------------------------------
    def protect(self, raw: np.ndarray) -> np.ndarray:
        assert self.protector is not None
        return self.protector.protect(raw)


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
