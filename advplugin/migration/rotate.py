"""Key rotation of a stored gallery without raw embeddings, and serving while it runs.

For `xnn`, a template under K1 becomes the template under K2 by one matrix (T2 · T1^-1), so
stored templates are re-keyed in place. Each chunk is one gallery transaction that replaces
the vectors and the key id together (`Gallery.replace_templates(..., from_key_id=K1)`, which
also logs the change for the FAISS index). The key id column is itself the checkpoint:
whatever still carries K1 is what is left, so an interrupted rotation simply re-runs, and a
row is never rotated twice (the transaction refuses rows not under K1).

While a rotation runs, the gallery holds templates under both keys, and the FAISS index
follows chunk by chunk (it replays `template_changes`). `KeyRing` serves that state: it
protects each probe under every key of the ring, and compares each template only with the
probe protected under the template's own key id. `xnn` keeps cosine scores exactly, so the
answers before, during and after the rotation are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.matcher import Match
from advplugin.gallery.models import Template
from advplugin.gallery.store import Gallery
from advplugin.keys import Key
from advplugin.migration.pipeline import _progress
from advplugin.protectors import KeyRotation, Protector, create_protector, xnn_rotation


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


def plan_rotation(gallery: Gallery, old: Key, new: Key) -> tuple[list[RotationGroup], int]:
    """What a rotation K1 -> K2 would re-key, refusing schemes that cannot be re-keyed.

    Returns the groups under the old key and the number of templates already under the new
    key (non-zero when an earlier run was interrupted).
    """
    if old.key_id == new.key_id:
        raise ValueError("the old and the new key are the same key")
    groups: dict[tuple[str, int, int], int] = {}
    already_new = 0
    for g in gallery.provenance(collection=None):
        if g["key_id"] == new.key_id:
            already_new += int(g["count"])  # type: ignore[call-overload]
        if g["key_id"] != old.key_id:
            continue
        k = (str(g["scheme"]), int(g["scheme_version"]), int(g["dim"]))  # type: ignore[call-overload]
        groups[k] = groups.get(k, 0) + int(g["count"])  # type: ignore[call-overload]
    plan = []
    for (scheme, version, dim), count in sorted(groups.items()):
        try:
            old_p = create_protector(scheme, key=old, dim=dim)
            new_p = create_protector(scheme, key=new, dim=dim)
            if old_p.scheme_version != version:
                raise ValueError(
                    f"{count} templates are {scheme} v{version}, this advplugin makes "
                    f"v{old_p.scheme_version}"
                )
            rotation = xnn_rotation(old_p, new_p)
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
) -> RotationResult:
    """Re-key every template under `old` to `new`, chunk by chunk, each chunk atomic."""
    plan, already_new = plan_rotation(gallery, old, new)
    start = time.perf_counter()
    rotated = chunks = 0
    total = sum(g.count for g in plan)
    with _progress(total, 0, "rotate", progress) as bar:
        for group in plan:
            batches = gallery.iter_templates(
                collection=None, key_id=old.key_id, scheme=group.scheme, chunk_size=chunk_size
            )
            for batch in batches:
                same = np.array(batch.scheme_version) == group.scheme_version
                ids = batch.ids[same]
                if not len(ids):
                    continue
                templates = group.rotation.apply(batch.vectors[same])
                gallery.replace_templates(ids, templates, key_id=new.key_id, from_key_id=old.key_id)
                rotated += len(ids)
                chunks += 1
                bar.update(len(ids))  # type: ignore[attr-defined]
                if on_chunk is not None:
                    on_chunk(chunks, rotated)
    return RotationResult(rotated, chunks, already_new, time.perf_counter() - start)


class KeyRing:
    """Identification while a gallery holds templates under several keys (mid-rotation).

    Uses the collection's FAISS index like `Matcher`: the probe is protected under every key
    of the ring and searched once per key; a candidate counts only for the probe protected
    under the candidate's own key id (a probe under K1 says nothing about a template under
    K2), and is scored by that key's protector. The best template per subject wins.
    """

    def __init__(
        self,
        gallery: Gallery,
        index: TemplateIndex,
        protectors: Sequence[Protector],
        *,
        candidates: int = 50,
    ) -> None:
        self.gallery = gallery
        self.index = index
        self.protectors = {p.metadata.key_id: p for p in protectors}
        if len(self.protectors) != len(protectors):
            raise ValueError("two protectors of the key ring have the same key id")
        self.candidates = candidates

    def identify(self, raw_probes: np.ndarray, *, k: int = 1) -> list[list[Match]]:
        best: list[dict[str, Match]] = [{} for _ in range(len(raw_probes))]
        for kid, protector in self.protectors.items():
            probes = protector.protect(raw_probes)
            _, ids = self.index.search(probes, max(self.candidates, 5 * k))
            valid = np.unique(ids[ids >= 0]).tolist()
            owner = _template_keys(self.gallery, valid)
            subjects = self.gallery.template_subjects(valid)
            for p, row in enumerate(ids):
                cand = [
                    int(i)
                    for i in row
                    if i >= 0 and owner.get(int(i)) == kid and int(i) in subjects
                ]
                if not cand:
                    continue
                sims = protector.score(probes[p : p + 1], self.index.vectors(np.array(cand)))[0]
                for tid, sim in zip(cand, sims.tolist(), strict=True):
                    name = subjects[tid]
                    if name not in best[p] or sim > best[p][name].similarity:
                        best[p][name] = Match(name, float(sim), tid)
        return [sorted(b.values(), key=lambda m: -m.similarity)[:k] for b in best]


def _template_keys(gallery: Gallery, ids: list[int]) -> dict[int, str | None]:
    """Key id of each template: which probe protection may be compared with it."""
    out: dict[int, str | None] = {}
    with gallery.engine.connect() as conn:
        for i in range(0, len(ids), 500):
            q = select(Template.id, Template.key_id).where(Template.id.in_(ids[i : i + 500]))
            out.update({int(t): kid for t, kid in conn.execute(q)})
    return out
