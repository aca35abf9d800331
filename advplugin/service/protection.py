"""What protects the served gallery: the scheme and its metadata, the scheme's scorer, and in
images mode the extractor and the keys. Built once at start from `Settings`.

Two modes share one shape, so the rest of the service never asks which mode it runs in:
- images: the service holds the key (and, during a key rotation, the retiring key too), so it
  extracts, protects, and can re-key client probes from the current key to the previous one;
- templates: it holds no key. Clients protect; the service checks what their templates carry
  against `expected` and matches them with the scheme's own scorer, which every registered
  scheme builds without a key (`SchemeInfo.scorer`).

Key rotation (docs/migration.md, "Rotating a live service"): with a previous key file the
service holds the retiring key as well. While templates under it remain, probes are protected
under both keys and matched by the gallery's `Matcher` under both (each template under its
own key); enrolments use the new key only. A scheme that cannot be re-keyed without raw
embeddings (`Protector.rotation_to` is None) has no use for a previous key, and says so.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advplugin.adapters import Extractor
from advplugin.errors import ConfigurationError  # raised here; imported from here by callers
from advplugin.gallery.matcher import ProbeSet
from advplugin.keys import Key, load_key, make_private_dir, write_key
from advplugin.protectors import (
    SCHEMES,
    KeyRotation,
    Protector,
    ProtectorMetadata,
    create_protector,
    scheme_info,
)
from advplugin.protectors.base import ScoreFn
from advplugin.settings import Settings

log = logging.getLogger("advplugin.service")

ROTATION_DOC = "docs/migration.md, 'Rotating a live service'"


@dataclass(frozen=True)
class KeyView:
    """How to serve one request of a collection, given the keys its templates are under."""

    current: str | None  # the key id enrolments use
    previous: Protector | None  # the retiring key, while templates under it remain
    unknown: list[str | None]  # key ids of templates this service holds no key for


class Protection:
    """The served scheme (`expected`: what every stored row must carry), its scorer, and, in
    images mode, the extractor and the protector(s). Read-only after start, except that the
    previous key is dropped once a rotation has finished (`retire_previous`)."""

    def __init__(
        self,
        *,
        expected: ProtectorMetadata,
        scorer: ScoreFn,
        extractor_name: str,
        extractor_version: str,
        extractor: Extractor | None = None,
        protector: Protector | None = None,
        previous: Protector | None = None,
    ) -> None:
        self.expected = expected
        self.scorer = scorer
        self.extractor_name = extractor_name
        self.extractor_version = extractor_version
        self.extractor = extractor
        self.extract_lock = threading.Lock()  # native extractors are not thread-safe
        self.protector = protector
        self.previous = previous
        self._rotation: KeyRotation | None = (
            protector.rotation_to(previous) if protector is not None and previous is not None else None
        )

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, *, create_key: bool = False) -> Protection:
        """The protection of `settings`. `create_key`: images mode makes the scheme key when
        its file is missing (only for a gallery without templates: a new key beside templates
        made under another one is a trap, so a missing key is an error there)."""
        scheme = settings.resolved_scheme
        if scheme not in SCHEMES:
            raise ConfigurationError(f"unknown scheme {scheme!r}; available: {', '.join(SCHEMES.names())}")
        if settings.mode == "images":
            return cls._images(settings, scheme, create_key=create_key)
        return cls._templates(settings, scheme)

    @classmethod
    def _images(cls, s: Settings, scheme: str, *, create_key: bool) -> Protection:
        from advplugin.adapters import create_extractor

        extractor = create_extractor(s.extractor)
        key_file = s.resolved_key_file
        if not key_file.exists():
            if not create_key:
                raise ConfigurationError(
                    f"the scheme key file {key_file} does not exist, and the gallery holds templates "
                    "made under a key: restore that file there, or point ADVPLUGIN_KEY_FILE (or "
                    "ADVPLUGIN_KEY_DIR) at it; no new key was made (docs/service.md)"
                )
            make_private_dir(key_file.parent)
            try:
                key = write_key(key_file)
            except FileExistsError:  # another process (a replica, a worker) made it first
                key = load_key(key_file)
            print(f"advplugin: created key file {key_file} (key id {key.key_id}); back it up, "
                  "apart from the data and its backups", flush=True)
        protector = _create(scheme, s, key=load_key(key_file), dim=extractor.dim)
        if not protector.protects and not s.allow_unprotected:
            raise ConfigurationError(
                f"scheme {scheme!r} stores raw embeddings; set ADVPLUGIN_ALLOW_UNPROTECTED=1 "
                "only for a baseline measurement"
            )
        previous = None
        if s.previous_key_file is not None:
            previous = _previous_protector(scheme, s, protector, s.previous_key_file)
        return cls(
            expected=protector.metadata, scorer=protector.score_fn,
            extractor_name=extractor.name, extractor_version=extractor.version,
            extractor=extractor, protector=protector, previous=previous,
        )

    @classmethod
    def _templates(cls, s: Settings, scheme: str) -> Protection:
        if s.previous_key_file is not None:
            raise ConfigurationError(
                "ADVPLUGIN_PREVIOUS_KEY_FILE is for images mode; template mode holds no key "
                f"and cannot serve a gallery under two keys ({ROTATION_DOC})"
            )
        info = scheme_info(scheme)
        if not info.protects and not s.allow_unprotected:
            raise ConfigurationError(f"scheme {scheme!r} stores raw embeddings; refused")
        if not s.template_key_id and info.keyed:
            raise ConfigurationError(
                "template mode needs ADVPLUGIN_TEMPLATE_KEY_ID (the key id of the clients' key)"
            )
        dim, opts = s.template_dim, s.scheme_options
        if not info.supports(dim):
            raise ConfigurationError(
                f"scheme {scheme!r} has trained weights for dimensions {info.dims}, not "
                f"ADVPLUGIN_TEMPLATE_DIM={dim}"
            )
        expected = ProtectorMetadata(
            scheme=scheme, scheme_version=info.version,
            key_id=s.template_key_id if info.keyed else None,
            input_dim=dim, output_dim=info.output_dim(dim, **opts), config_digest=info.config_digest(dim, **opts),
        )
        return cls(
            expected=expected, scorer=info.scorer(dim, **opts),
            extractor_name=s.template_extractor, extractor_version="client",
        )

    # -- keys ----------------------------------------------------------------------------------------
    def served_key_ids(self) -> set[str | None]:
        previous = self.previous
        return {self.expected.key_id} | ({previous.metadata.key_id} if previous else set())

    def retire_previous(self) -> None:
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

    def scorers(self, view: KeyView) -> dict[str | None, ScoreFn]:
        """The scorer under every key the view needs (one key outside a rotation)."""
        out = {view.current: self.scorer}
        if view.previous is not None:
            out[view.previous.metadata.key_id] = view.previous.score_fn
        return out

    def protect_for(self, view: KeyView, raw: np.ndarray) -> ProbeSet:
        """Raw embeddings protected under every key the view needs (current key first)."""
        assert self.protector is not None
        out = {view.current: self.protector.protect(raw)}
        if view.previous is not None:
            out[view.previous.metadata.key_id] = view.previous.protect(raw)
        return out

    def convert_for(self, view: KeyView, templates: np.ndarray) -> ProbeSet:
        """Client probe templates under the current key, re-keyed to the previous one while a
        rotation runs (without raw embeddings, as the rotation itself does)."""
        if view.previous is None:
            return {view.current: templates}
        assert self._rotation is not None
        return {view.current: templates, view.previous.metadata.key_id: self._rotation.apply(templates)}


def _create(scheme: str, s: Settings, *, key: Key, dim: int) -> Protector:
    """The protector of the settings: scheme, key, dimension and ADVPLUGIN_SCHEME_OPTIONS."""
    try:
        return create_protector(scheme, key=key, dim=dim, **s.scheme_options)
    except (TypeError, ValueError) as e:
        raise ConfigurationError(f"scheme {scheme!r} with ADVPLUGIN_SCHEME_OPTIONS: {e}") from None


def _previous_protector(scheme: str, s: Settings, current: Protector, path: Path) -> Protector:
    if not path.is_file():
        raise ConfigurationError(f"the previous key file {path} does not exist")
    previous = _create(scheme, s, key=load_key(path), dim=current.dim)
    if previous.metadata.key_id == current.metadata.key_id:
        raise ConfigurationError(
            f"the previous key file {path} holds the same key (key id {current.metadata.key_id}) "
            "as the key file; the previous key is the one being retired"
        )
    if previous.rotation_to(current) is None:
        raise ConfigurationError(
            f"scheme {scheme!r} cannot be re-keyed without raw embeddings, so a previous key "
            "is of no use: re-enrol, or migrate from the raw source with the new key"
        )
    return previous
