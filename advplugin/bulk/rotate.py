"""Key rotation of a stored gallery without raw embeddings, and serving while it runs.

For `xnn`, a template under K1 becomes the template under K2 by one matrix (T2 · T1^-1), so
stored templates are re-keyed in place. Each chunk is one gallery transaction that replaces
the vectors and the key id together (`Gallery.replace_templates(..., from_key_id=K1)`, which
also logs the change for the FAISS index). The key id column is itself the checkpoint:
whatever still carries K1 is what is left, so an interrupted rotation simply re-runs, and a
row is never rotated twice (the transaction refuses rows not under K1).

While a rotation runs, the gallery holds templates under both keys, and the FAISS index
follows chunk by chunk (it replays `template_changes`). The gallery's `Matcher`, given the
scorers of both keys, serves that state (`advplugin.gallery.matcher`): each template is
compared only with the probe protected under its own key id. `xnn` keeps cosine scores
exactly, so the answers before, during and after the rotation are the same.

Whether a scheme can be re-keyed at all is its own declaration (`Protector.rotation_to`),
not a check of its type here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from advplugin.bulk.pipeline import _progress
from advplugin.gallery import Gallery
from advplugin.gallery.audit import CLI
from advplugin.keys import Key
from advplugin.protectors import KeyRotation, create_protector


@dataclass(frozen=True)
class RotationGroup:
    """Templates under the old key that share scheme, version and dimension."""

    scheme: str
    scheme_version: int
    dim: int
    count: int
    rotation: KeyRotation


@dataclass
class RotationResult:
    rotated: int
    chunks: int
    already_new: int  # templates that were under the new key before this run
    seconds: float


def plan_rotation(
    gallery: Gallery, old: Key, new: Key, options: Mapping[str, object] | None = None
) -> tuple[list[RotationGroup], int]:
    """What a rotation K1 -> K2 would re-key, refusing schemes that cannot be re-keyed.
    `options`: the scheme options the templates were made with (their config digest must
    match), e.g. `{"release": 1}` for an earlier release of a trained scheme.

    Returns the groups under the old key and the number of templates already under the new
    key (non-zero when an earlier run was interrupted).
    """
    options = dict(options or {})
    if old.key_id == new.key_id:
        raise ValueError("the old and the new key are the same key")
    groups: dict[tuple[str, int, int, str], int] = {}
    already_new = 0
    for g in gallery.provenance(collection=None):
        if g["key_id"] == new.key_id:
            already_new += int(g["count"])  # type: ignore[call-overload]
        if g["key_id"] != old.key_id:
            continue
        k = (str(g["scheme"]), int(g["scheme_version"]), int(g["dim"]), str(g["config_digest"]))  # type: ignore[call-overload]
        groups[k] = groups.get(k, 0) + int(g["count"])  # type: ignore[call-overload]
    plan = []
    for (scheme, version, dim, digest), count in sorted(groups.items()):
        try:
            old_p = create_protector(scheme, key=old, dim=dim, **options)
            new_p = create_protector(scheme, key=new, dim=dim, **options)
            if old_p.scheme_version != version:
                raise ValueError(
                    f"{count} templates are {scheme} v{version}, this advplugin makes "
                    f"v{old_p.scheme_version}"
                )
            if old_p.metadata.config_digest != digest:
                raise ValueError(
                    f"{count} templates were made with {scheme} options (config digest "
                    f"{digest}) other than the ones this rotation would use "
                    f"({old_p.metadata.config_digest}; pass the scheme's --option values)"
                )
            rotation = old_p.rotation_to(new_p)
            if rotation is None:
                raise ValueError(f"scheme {scheme!r} declares no key rotation")
        except ValueError as e:
            raise ValueError(
                f"cannot rotate {count} templates of scheme {scheme!r} (v{version}) without raw "
                f"embeddings ({e}). Re-protect them from the raw source with `advplugin migrate "
                f"--key NEWKEY`, or re-enrol those subjects from their images."
            ) from None
        plan.append(RotationGroup(scheme, version, dim, count, rotation))
    return plan, already_new


def rotate_key(
    gallery: Gallery,
    old: Key,
    new: Key,
    *,
    chunk_size: int = 10_000,
    progress: bool = False,
    on_chunk: Callable[[int, int], None] | None = None,
    options: Mapping[str, object] | None = None,
) -> RotationResult:
    """Re-key every template under `old` to `new`, chunk by chunk and collection by
    collection, each chunk atomic together with its `rotate_key` audit event (`options`:
    see `plan_rotation`)."""
    plan, already_new = plan_rotation(gallery, old, new, options)
    start = time.perf_counter()
    rotated = chunks = 0
    total = sum(g.count for g in plan)
    with _progress(total, 0, "rotate", progress) as bar:
        for group, collection in ((g, c) for g in plan for c in gallery.collections()):
            batches = gallery.iter_templates(
                collection=collection, key_id=old.key_id, scheme=group.scheme, chunk_size=chunk_size
            )
            for batch in batches:
                same = np.array(batch.scheme_version) == group.scheme_version
                ids = batch.ids[same]
                if not len(ids):
                    continue
                templates = group.rotation.apply(batch.vectors[same])
                # The chunk and its audit event commit together (or neither, if interrupted).
                with gallery.transaction() as g:
                    g.replace_templates(ids, templates, key_id=new.key_id, from_key_id=old.key_id)
                    g.record_audit(CLI, "rotate_key", collection=collection, template_count=len(ids))
                rotated += len(ids)
                chunks += 1
                bar.update(len(ids))  # type: ignore[attr-defined]
                if on_chunk is not None:
                    on_chunk(chunks, rotated)
    return RotationResult(rotated, chunks, already_new, time.perf_counter() - start)
