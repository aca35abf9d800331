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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from advplugin.bulk.pipeline import _progress
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.matcher import Match, best_subjects
from advplugin.gallery.store import DEFAULT_COLLECTION, Gallery
from advplugin.keys import Key
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

    Uses the collection's FAISS index like `Matcher`: the probe, protected under every key of
    the ring, is searched once per key; a candidate counts only for the probe protected under
    the candidate's own key id (a probe under K1 says nothing about a template under K2), and
    is scored by that key's protector against its vector read from SQL together with its key
    id (the index may lag a chunk behind; SQL pairs each vector with its true key). The best
    template per subject wins.
    """

    def __init__(
        self,
        gallery: Gallery,
        index: TemplateIndex,
        protectors: Sequence[Protector],
        *,
        collection: str = DEFAULT_COLLECTION,
        candidates: int = 50,
    ) -> None:
        self.gallery = gallery
        self.index = index
        self.protectors = {p.metadata.key_id: p for p in protectors}
        if len(self.protectors) != len(protectors):
            raise ValueError("two protectors of the key ring have the same key id")
        self.collection = collection
        self.candidates = candidates
        self._rotations: dict[tuple[str | None, str | None], KeyRotation] = {}

    def protect(self, raw_probes: np.ndarray) -> dict[str | None, np.ndarray]:
        """The probes protected under every key of the ring."""
        return {kid: p.protect(raw_probes) for kid, p in self.protectors.items()}

    def convert(self, templates: np.ndarray, key_id: str | None) -> dict[str | None, np.ndarray]:
        """Templates protected under one key of the ring, re-keyed to every other key (`xnn`
        without raw embeddings, as the rotation itself does)."""
        out = {}
        for kid, p in self.protectors.items():
            if kid == key_id:
                out[kid] = templates
                continue
            if (key_id, kid) not in self._rotations:
                self._rotations[key_id, kid] = xnn_rotation(self.protectors[key_id], p)
            out[kid] = self._rotations[key_id, kid].apply(templates)
        return out

    def identify(
        self, raw_probes: np.ndarray, *, k: int = 1, threshold: float | None = None
    ) -> list[list[Match]]:
        return self.identify_protected(self.protect(raw_probes), k=k, threshold=threshold)

    def identify_protected(
        self, probes: Mapping[str | None, np.ndarray], *, k: int = 1, threshold: float | None = None
    ) -> list[list[Match]]:
        """`probes[key_id]`: the same probes protected under each key of the ring."""
        n = len(next(iter(probes.values())))
        scored: list[list[tuple[int, str, float]]] = [[] for _ in range(n)]
        for kid, templates in probes.items():
            protector = self.protectors[kid]
            _, ids = self.index.search(templates, max(self.candidates, 5 * k))
            rows = self.gallery.template_rows(np.unique(ids[ids >= 0]).tolist())
            for p, row in enumerate(ids):
                cand = [int(i) for i in row if int(i) in rows and rows[int(i)].key_id == kid]
                if not cand:
                    continue
                gallery = np.stack([rows[i].vector for i in cand])
                sims = protector.score(templates[p : p + 1], gallery)[0]
                scored[p].extend(zip(cand, (rows[i].subject for i in cand), sims.tolist(), strict=True))
        return [best_subjects(s, k=k, threshold=threshold) for s in scored]

    def verify(self, probes: Mapping[str | None, np.ndarray], subject: str) -> Match:
        """The best similarity of one probe (protected under each key) to any template of
        `subject`, each template compared under its own key. SubjectNotFound if absent."""
        ids = self.gallery.subject_template_ids(subject, collection=self.collection)
        if not ids:
            self.gallery.get_subject(subject, collection=self.collection)  # raises if absent
            return Match(subject, float("-inf"), -1)
        scored: list[tuple[int, str, float]] = []
        rows = self.gallery.template_rows(ids)
        for kid, probe in probes.items():
            mine = [i for i in ids if i in rows and rows[i].key_id == kid]
            if mine:
                vecs = np.stack([rows[i].vector for i in mine])
                sims = self.protectors[kid].score(probe.reshape(1, -1), vecs)[0]
                scored.extend((i, subject, s) for i, s in zip(mine, sims.tolist(), strict=True))
        best = best_subjects(scored, k=1)
        return best[0] if best else Match(subject, float("-inf"), -1)
