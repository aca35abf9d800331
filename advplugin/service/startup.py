"""Start-up checks: open the gallery (`open_service_gallery`: the one opener of
`advplugin.gallery.opening`, with the settings' keys through `advplugin.install`; a brand-new
embedded gallery is created), refuse to serve one this service cannot match correctly, and
make sure a fresh gallery has an API key. Each check says what to run.

Why refuse instead of serving: templates of another scheme, another configuration of the
scheme, another dimension, or under a key this service lacks give meaningless scores, which
look like answers (a wrong person identified) rather than errors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from advplugin.gallery import Gallery
from advplugin.gallery.apikeys import hash_api_key
from advplugin.gallery.audit import Actor
from advplugin.install import key_location_warnings, open_configured_gallery, prepare_data_dir
from advplugin.service.protection import ROTATION_DOC, ConfigurationError, Protection
from advplugin.settings import Settings


def warn_key_locations(settings: Settings) -> None:
    for w in key_location_warnings(settings):
        print(f"advplugin: WARNING: {w}", flush=True)


def open_service_gallery(settings: Settings) -> Gallery:
    """The gallery database, opened by the one opener (`advplugin.gallery.opening`) with the
    settings' keys, its WAL folded in. Embedded default only: a brand-new SQLite file in the
    data folder is created and migrated. An existing database is never migrated implicitly."""
    prepare_data_dir(settings.data_dir)
    fresh = settings.database_url is None and not (settings.data_dir / "gallery.db").exists()
    return open_configured_gallery(settings, upgrade=fresh, checkpoint=True)


def check_gallery_matches(gallery: Gallery, protection: Protection, settings: Settings) -> None:
    """Refuse a gallery whose templates were made by another scheme, configuration or
    dimension, or under a key this service does not hold. Retires the previous key at once
    when a rotation has already finished."""
    e = protection.expected
    ours = (e.scheme, e.scheme_version, e.output_dim, e.config_digest)
    by_key: dict[str | None, int] = {}
    for row in gallery.provenance(collection=None):
        if (row["scheme"], row["scheme_version"], row["dim"], row["config_digest"]) != ours:
            raise ConfigurationError(
                f"the gallery holds {row['count']} templates of scheme {row['scheme']} "
                f"v{row['scheme_version']} (config {row['config_digest']}), key id {row['key_id']}, "
                f"dim {row['dim']}, but this service protects with {e.scheme} v{e.scheme_version} "
                f"(config {e.config_digest}), key id {e.key_id}, dim {e.output_dim}; migrate or "
                "re-enrol them first, or, for a gallery of other scheme options (an earlier release "
                "of a trained scheme), serve it with those: ADVPLUGIN_SCHEME_OPTIONS='{\"release\": 1}'"
            )
        kid = row["key_id"]
        by_key[kid] = by_key.get(kid, 0) + int(row["count"])  # type: ignore[call-overload]
    unknown = [k for k in by_key if k not in protection.served_key_ids()]
    if unknown:
        raise ConfigurationError(key_mismatch_message(protection, settings, unknown, by_key))
    if protection.previous is not None:
        old = protection.previous.metadata.key_id
        if old in by_key:
            print(
                f"advplugin: serving during a key rotation: {by_key[old]} templates under the "
                f"previous key id {old}, {by_key.get(e.key_id, 0)} under key id {e.key_id}; "
                "finish it with `advplugin rotate-key`",
                flush=True,
            )
        else:
            protection.retire_previous()


def key_mismatch_message(
    protection: Protection,
    settings: Settings,
    unknown: list[str | None],
    by_key: Mapping[str | None, int] | None = None,
) -> str:
    """What is wrong and what to run, when templates are under a key this service lacks."""
    e = protection.expected
    if by_key:
        held = ", ".join(
            f"{n} under key id {k}" + (" (this service's key)" if k == e.key_id else "")
            for k, n in by_key.items()
        )
        found = f"the gallery holds templates {held}"
    else:
        found = f"the gallery now holds templates under key id {', '.join(map(str, unknown))}"
    if settings.mode == "templates":
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


def bootstrap_api_key(gallery: Gallery, settings: Settings) -> None:
    """A gallery without API keys gets one: ADVPLUGIN_API_KEY's (stored hashed), or a new
    one written to data_dir/api-key (0600) and announced."""
    if gallery.api_key_hashes():
        return
    service = Actor("service")
    if settings.api_key is not None:
        gallery.create_api_key_hash(hash_api_key(settings.api_key.get_secret_value()), "bootstrap", actor=service)
        if settings.api_key_exact_scores:
            gallery.configure_api_key("bootstrap", exact_scores=True, actor=service)
        return
    api_key = gallery.create_api_key("bootstrap", actor=service)
    if settings.api_key_exact_scores:
        gallery.configure_api_key("bootstrap", exact_scores=True, actor=service)
    path = settings.data_dir / "api-key"
    if path.exists():
        path.unlink()
    _write_secret_file(path, api_key)
    print(f"advplugin: created an API key, stored hashed; the key is in {path} (mode 0600)", flush=True)


def _write_secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
