"""Matching protected probes against the protected gallery.

FAISS proposes candidates (cosine on normalised templates); the final similarity of every
candidate is the protector's own `score`, so schemes whose matcher is not plain cosine (a
distilled network) rank correctly, and the service's scores equal offline scores. Only
protected templates ever reach this module: probes are protected by the same scheme and key
before they get here (the service checks their metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np

from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.store import DEFAULT_COLLECTION, Gallery
from advplugin.protectors.base import cosine_score as base_cosine_score

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def cosine_score(dim: int) -> ScoreFn:
    """The base protector's cosine score for a service that holds no key (template mode)."""
    return partial(base_cosine_score, dim=dim)


@dataclass(frozen=True)
class Match:
    subject: str
    similarity: float
    template_id: int


def best_subjects(
    scored: Iterable[tuple[int, str, float]], *, k: int, threshold: float | None = None
) -> list[Match]:
    """The best `k` subjects of (template id, subject, similarity) candidates, each subject by
    its best template, best first, only those >= threshold when one is given."""
    best: dict[str, Match] = {}
    for tid, name, sim in scored:
        if name not in best or sim > best[name].similarity:
            best[name] = Match(name, float(sim), int(tid))
    ranked = sorted(best.values(), key=lambda m: -m.similarity)
    if threshold is not None:
        ranked = [m for m in ranked if m.similarity >= threshold]
    return ranked[:k]


class Matcher:
    def __init__(
        self,
        gallery: Gallery,
        index: TemplateIndex,
        score: ScoreFn,
        *,
        collection: str = DEFAULT_COLLECTION,
        candidates: int = 50,
    ) -> None:
        self.gallery = gallery
        self.index = index
        self.score = score
        self.collection = collection
        self.candidates = candidates

    def identify(
        self, probes: np.ndarray, *, k: int = 1, threshold: float | None = None
    ) -> list[list[Match]]:
        """Per probe, the best `k` subjects (each by its best template), best first, only
        those with similarity >= threshold when one is given."""
        if len(probes) == 0:
            return []
        n_cand = max(self.candidates, 5 * k)
        _, ids = self.index.search(probes, n_cand)
        valid = np.unique(ids[ids >= 0])
        subjects = self.gallery.template_subjects(valid.tolist()) if len(valid) else {}
        results: list[list[Match]] = []
        for p, row in enumerate(ids):
            cand = np.array([i for i in row if i >= 0 and int(i) in subjects], np.int64)
            if not len(cand):
                results.append([])
                continue
            sims = self.score(probes[p : p + 1], self.index.vectors(cand))[0]
            scored = ((t, subjects[t], s) for t, s in zip(cand.tolist(), sims.tolist(), strict=True))
            results.append(best_subjects(scored, k=k, threshold=threshold))
        return results

    def verify(self, probe: np.ndarray, subject: str) -> Match:
        """The probe's best similarity to any template of `subject` (SubjectNotFound if absent)."""
        ids = self.gallery.subject_template_ids(subject, collection=self.collection)
        if not ids:
            self.gallery.get_subject(subject, collection=self.collection)  # raises if absent
            return Match(subject, float("-inf"), -1)
        stored = self.gallery.get_templates(ids)
        vecs = np.stack([stored[i][1] for i in ids])
        sims = self.score(probe.reshape(1, -1), vecs)[0]
        j = int(np.argmax(sims))
        return Match(subject, float(sims[j]), ids[j])
