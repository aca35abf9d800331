"""Everything the service holds while running: gallery, protector (images mode), extractor,
one FAISS index per collection, API-key hashes. Built once at start by `ServiceState.start`,
which also enforces the embedded defaults and refuses unsafe or inconsistent configurations.

Key rotation (docs/migration.md, "Rotating a live service"): with a previous key file the
service holds the retiring key as well. While templates under it remain, probes are protected
under both keys and matched through `KeyRing` (each template under its own key); enrolments
use the new key only. The service follows the gallery through the change log the index
replays, so it notices a rotation running in another process, and its end, without scans.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advplugin.bulk.rotate import KeyRing
from advplugin.gallery.index import IndexConfig, TemplateIndex
from advplugin.gallery.matcher import Match, Matcher, ScoreFn, cosine_score
from advplugin.gallery.store import Gallery, hash_api_key
from advplugin.keys import load_key, write_key
from advplugin.protectors import (
    SCHEMES,
    Protector,
    ProtectorMetadata,
    create_protector,
    xnn_rotation,
)
from advplugin.settings import Settings

log = logging.getLogger("advplugin.service")


class ConfigurationError(RuntimeError):
    """The service cannot start with this configuration; the message says how to fix it."""


ROTATION_DOC = "docs/migration.md, 'Rotating a live service'"


@dataclass(frozen=True)
class KeyView:
    """How to serve one request of a collection, given the keys its templates are under."""

    current: str | None  # the key id enrolments use
    previous: Protector | None  # the retiring key, while templates under it remain
    unknown: list[str | None]  # key ids of templates this service holds no key for


@dataclass
class _KeyWatch:
    """Key ids that have templates in a collection, as of change-log entry `seq` (a superset:
    ids whose last template went are dropped when next checked)."""

    seq: int
    key_ids: set[str | None] = field(default_factory=set)


def _write_secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gallery: Gallery
        self.protector: Protector | None = None
        self.previous: Protector | None = None  # images mode, during a key rotation
        self._watch: dict[str, _KeyWatch] = {}
        self._keys_lock = threading.Lock()
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
            if s.previous_key_file is not None:
                self.previous = self._previous_protector(scheme, protector, s.previous_key_file)
            self.expected = protector.metadata
            self.extractor_name, self.extractor_version = self.extractor.name, self.extractor.version
            self.score = protector.score
        else:
            if s.previous_key_file is not None:
                raise ConfigurationError(
                    "ADVPLUGIN_PREVIOUS_KEY_FILE is for images mode; template mode holds no key "
                    f"and cannot serve a gallery under two keys ({ROTATION_DOC})"
                )
            if scheme == "none" and not s.allow_unprotected:
                raise ConfigurationError("scheme 'none' stores raw embeddings; refused")
            if not s.template_key_id and scheme != "none":
                raise ConfigurationError(
                    "template mode needs ADVPLUGIN_TEMPLATE_KEY_ID (the key id of the clients' key)"
                )
            version = self._scheme_version(scheme, s.template_dim)
            self.expected = ProtectorMetadata(
                scheme=scheme, scheme_version=version, key_id=s.template_key_id,
                input_dim=s.template_dim, output_dim=s.template_dim,
            )
            self.extractor_name, self.extractor_version = s.template_extractor, "client"
            self.score = cosine_score(s.template_dim)

    @staticmethod
    def _scheme_version(scheme: str, dim: int) -> int:
        """A scheme's version without its key: build it with a throwaway key at the served
        dimension (learned schemes have weights for some dimensions only)."""
        from advplugin.keys import Key

        return create_protector(scheme, key=Key.generate(), dim=dim).scheme_version

    @staticmethod
    def _previous_protector(scheme: str, current: Protector, path: Path) -> Protector:
        if not path.is_file():
            raise ConfigurationError(f"the previous key file {path} does not exist")
        previous = create_protector(scheme, key=load_key(path), dim=current.dim)
        if previous.metadata.key_id == current.metadata.key_id:
            raise ConfigurationError(
                f"the previous key file {path} holds the same key (key id {current.metadata.key_id}) "
                "as the key file; the previous key is the one being retired"
            )
        try:
            xnn_rotation(previous, current)
        except ValueError:
            raise ConfigurationError(
                f"scheme {scheme!r} cannot be re-keyed without raw embeddings, so a previous key "
                "is of no use: re-enrol, or migrate from the raw source with the new key"
            ) from None
        return previous

    def served_key_ids(self) -> set[str | None]:
        previous = self.previous
        return {self.expected.key_id} | ({previous.metadata.key_id} if previous else set())

    def _check_gallery_matches(self) -> None:
        """Refuse to serve a gallery whose templates were made by another scheme, or under a
        key this service does not hold: scores between them would be meaningless."""
        e = self.expected
        by_key: dict[str | None, int] = {}
        for row in self.gallery.provenance(collection=None):
            if (row["scheme"], row["scheme_version"], row["dim"]) != (e.scheme, e.scheme_version, e.output_dim):
                raise ConfigurationError(
                    f"the gallery holds {row['count']} templates of scheme {row['scheme']} "
                    f"v{row['scheme_version']}, key id {row['key_id']}, dim {row['dim']}, but this "
                    f"service protects with {e.scheme} v{e.scheme_version}, key id {e.key_id}, "
                    f"dim {e.output_dim}; migrate or re-enrol them first"
                )
            kid = row["key_id"]
            by_key[kid] = by_key.get(kid, 0) + int(row["count"])  # type: ignore[call-overload]
        unknown = [k for k in by_key if k not in self.served_key_ids()]
        if unknown:
            raise ConfigurationError(self.key_mismatch_message(unknown, by_key))
        if self.previous is not None:
            old = self.previous.metadata.key_id
            if old in by_key:
                print(
                    f"advplugin: serving during a key rotation: {by_key[old]} templates under the "
                    f"previous key id {old}, {by_key.get(e.key_id, 0)} under key id {e.key_id}; "
                    "finish it with `advplugin rotate-key`",
                    flush=True,
                )
            else:
                self._retire_previous()

    def key_mismatch_message(
        self, unknown: list[str | None], by_key: Mapping[str | None, int] | None = None
    ) -> str:
        """What is wrong and what to run, when templates are under a key this service lacks."""
        e = self.expected
        if by_key:
            held = ", ".join(
                f"{n} under key id {k}" + (" (this service's key)" if k == e.key_id else "")
                for k, n in by_key.items()
            )
            found = f"the gallery holds templates {held}"
        else:
            found = f"the gallery now holds templates under key id {', '.join(map(str, unknown))}"
        if self.settings.mode == "templates":
            return (
                f"{found}, but clients protect with key id {e.key_id} (ADVPLUGIN_TEMPLATE_KEY_ID). "
                "Template mode holds no key, so it cannot match a gallery under two keys: finish "
                "the key rotation (`advplugin rotate-key`), then restart with "
                f"ADVPLUGIN_TEMPLATE_KEY_ID=<the new key id> and give clients the new key ({ROTATION_DOC})"
            )
        return (
            f"{found}, and this service holds no key for {', '.join(map(str, unknown))}. During a "
            "key rotation OLD -> NEW, run the service with ADVPLUGIN_KEY_FILE=<NEW key file> and "
            "ADVPLUGIN_PREVIOUS_KEY_FILE=<OLD key file> (it answers correctly throughout), and "
            "finish the rotation with `advplugin rotate-key --old-key OLD --new-key NEW`; "
            f"otherwise use the key file these templates were made with ({ROTATION_DOC})"
        )

    def _retire_previous(self) -> None:
        """The rotation is finished: no template anywhere is under the previous key."""
        previous, self.previous = self.previous, None
        if previous is not None:
            msg = (
                f"key rotation finished: no template is under the previous key id "
                f"{previous.metadata.key_id}; it is no longer used. Restart without "
                "ADVPLUGIN_PREVIOUS_KEY_FILE and destroy that key file."
            )
            log.warning(msg)
            print(f"advplugin: {msg}", flush=True)

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
                # The change-log position first, then the key ids: a change in between is
                # looked at again by `keys` (harmless), never missed.
                watch = _KeyWatch(seq=self.gallery.last_change_seq(collection=collection))
                watch.key_ids = {r["key_id"] for r in self.gallery.provenance(collection=collection)}
                # Persist only what the snapshot lacks: a rebuild or replayed changes.
                if not index.load() or index._changes_since_snapshot:
                    index.save()
                self._watch[collection] = watch
                self._indexes[collection] = index
            return self._indexes[collection]

    def matcher(self, collection: str) -> Matcher:
        return Matcher(self.gallery, self.index(collection), self.score, collection=collection)

    # -- keys of a collection (key rotation) -----------------------------------------------------
    def keys(self, collection: str) -> KeyView:
        """Which keys the collection's templates are under, up to what its index holds.

        Cheap per request: only change-log entries not yet looked at are read (which key ids
        did they touch?), plus one indexed existence probe per key id other than the
        current one (has its last template gone: rotation finished, subjects deleted?).
        """
        index = self.index(collection)
        with self._keys_lock:
            watch = self._watch[collection]
            current = self.expected.key_id
            dropped = False
            for kid in [k for k in watch.key_ids if k != current]:
                if not self.gallery.has_templates(key_id=kid, collection=collection):
                    watch.key_ids.discard(kid)
                    dropped = True
            if dropped:
                index.catch_up()  # the index must not hold vectors under a dropped key
            else:
                index.sync()
            if index.last_seq > watch.seq:
                watch.key_ids |= self.gallery.key_ids_changed(watch.seq, index.last_seq, collection=collection)
                watch.seq = index.last_seq
            previous = self.previous
            old = previous.metadata.key_id if previous is not None else None
            if previous is not None and old not in watch.key_ids:
                if not self.gallery.has_templates(key_id=old, collection=None):
                    self._retire_previous()
                previous = None
            unknown = sorted((k for k in watch.key_ids if k not in (current, old)), key=str)
            return KeyView(current=current, previous=previous, unknown=unknown)

    def protect_for(self, view: KeyView, raw: np.ndarray) -> dict[str | None, np.ndarray]:
        """Raw embeddings protected under every key the view needs (current key first)."""
        assert self.protector is not None
        out = {view.current: self.protector.protect(raw)}
        if view.previous is not None:
            out[view.previous.metadata.key_id] = view.previous.protect(raw)
        return out

    def convert_for(self, view: KeyView, collection: str, templates: np.ndarray) -> dict[str | None, np.ndarray]:
        """Probe templates under the current key, re-keyed to the previous one if needed."""
        if view.previous is None:
            return {view.current: templates}
        return self.key_ring(view, collection).convert(templates, view.current)

    def key_ring(self, view: KeyView, collection: str) -> KeyRing:
        assert self.protector is not None and view.previous is not None
        return KeyRing(
            self.gallery, self.index(collection), [self.protector, view.previous], collection=collection
        )

    def identify(
        self, view: KeyView, collection: str, probes: Mapping[str | None, np.ndarray], *,
        k: int, threshold: float | None,
    ) -> list[list[Match]]:
        if view.previous is None:
            return self.matcher(collection).identify(probes[view.current], k=k, threshold=threshold)
        return self.key_ring(view, collection).identify_protected(probes, k=k, threshold=threshold)

    def verify(
        self, view: KeyView, collection: str, probes: Mapping[str | None, np.ndarray], subject: str
    ) -> Match:
        if view.previous is None:
            return self.matcher(collection).verify(probes[view.current][0], subject)
        one = {kid: t[:1] for kid, t in probes.items()}
        return self.key_ring(view, collection).verify(one, subject)

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


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
