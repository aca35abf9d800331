"""Matching protected probes against the protected gallery, under one key or several.

The index proposes candidates (cosine on normalised templates); the final similarity of every
candidate is the scheme's own scorer (`Protector.scorer`, built without a key), so a scheme
whose matcher is not plain cosine (a distilled network) ranks correctly in every mode, and
the service's scores equal offline scores. Only protected templates ever reach this module:
probes are protected by the gallery's scheme before they get here.

Several keys are the state of a gallery during a key rotation: some templates under the old
key, some under the new. The probes arrive protected under every key (`ProbeSet`: key id ->
templates); each is searched once per key, and a candidate counts only for the probe
protected under the candidate's *own* key id (a probe under K1 says nothing about a template
under K2). Its vector is then read from SQL in the same row as its key id, because the index
may lag a chunk behind a rotation and SQL pairs each vector with its true key. The best
template per subject wins.

One key, the usual case, costs little more than the index search itself: every template is
under that key, so subject names come from the index's in-memory subject map (read under the
same lock as the search, so a concurrent delete cannot split them), and when the scheme's
score is the index's own cosine (`CosineScorer.matches_index`) the index's scores are final;
any other scorer re-scores the candidates with their vectors from the index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from advplugin.gallery.database import DEFAULT_COLLECTION
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.store import Gallery
from advplugin.protectors.base import Protector, ScoreFn

#: The same probes protected under each key the matcher serves: {key id: templates [P, d]}.
ProbeSet = Mapping[str | None, np.ndarray]
#: How many index candidates are re-scored per probe and key, unless configured.
DEFAULT_CANDIDATES = 50


class Match(NamedTuple):
    """One answer. A named tuple, not a frozen dataclass: one is made per probe on the
    request path, and a frozen dataclass's `__init__` cost as much as the rest of a 10k
    identification's bookkeeping."""

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
    """Identification and verification for one collection, under one or more keys.

    `scorers`: {key id: the scheme's scorer under that key}, or one scorer for one key."""

    def __init__(
        self,
        gallery: Gallery,
        index: TemplateIndex,
        scorers: Mapping[str | None, ScoreFn] | ScoreFn,
        *,
        collection: str = DEFAULT_COLLECTION,
        candidates: int = DEFAULT_CANDIDATES,
    ) -> None:
        if not callable(scorers) and not scorers:
            raise ValueError("a matcher needs the scorer of at least one key")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        self.gallery = gallery
        self.index = index
        # One scorer alone: a single key, whatever its id (probes then come as one array).
        self.scorers = {None: scorers} if callable(scorers) else dict(scorers)
        self.collection = collection
        self.candidates = candidates

    @classmethod
    def for_protectors(
        cls, gallery: Gallery, index: TemplateIndex, protectors: Sequence[Protector], **kwargs: object
    ) -> Matcher:
        """A matcher scoring with each protector's scheme, under its key id."""
        scorers = {p.metadata.key_id: p.score_fn for p in protectors}
        if len(scorers) != len(protectors):
            raise ValueError("two protectors have the same key id")
        return cls(gallery, index, scorers, **kwargs)  # type: ignore[arg-type]

    def _probe_set(self, probes: ProbeSet | np.ndarray) -> dict[str | None, np.ndarray]:
        if isinstance(probes, np.ndarray):
            if len(self.scorers) != 1:
                raise ValueError("with several keys, pass the probes protected under each key id")
            return {next(iter(self.scorers)): probes}
        unknown = [k for k in probes if k not in self.scorers]
        if unknown:
            raise ValueError(f"probes under key ids this matcher does not serve: {unknown}")
        if len({len(t) for t in probes.values()}) > 1:
            raise ValueError("the probes under each key must be the same probes")
        return dict(probes)

    def _candidates(self, key_id: str | None, ids: np.ndarray) -> dict[int, tuple[str, np.ndarray]]:
        """{template id: (subject, vector)} of the candidates under `key_id` that still exist,
        read from SQL in one snapshot (each vector with its true key id)."""
        if not len(ids):
            return {}
        rows = self.gallery.template_rows(ids.tolist())
        return {i: (r.subject, r.vector) for i, r in rows.items() if r.key_id == key_id}

    def _identify_one_key(
        self, probes: np.ndarray, score: ScoreFn, *, k: int, threshold: float | None
    ) -> list[list[Match]]:
        """One key: every template in the index is under it, so names come from the index's
        subject map and, when the scheme's score is the index's own cosine (`matches_index`),
        the index's scores are final: no SQL and no vector read per identification."""
        n_cand = max(self.candidates, 5 * k)
        ranked = getattr(score, "matches_index", False)  # the index's order is final
        if ranked and k == 1 and len(probes) == 1:  # the usual request: its best candidate
            sim, tid, code = self.index.search_best_subject(probes, n_cand)
            if threshold is not None and sim < threshold:
                return [[]]  # ranked: every other candidate scores lower still
            if code >= 0 and math.isfinite(sim):
                return [[Match(self.index.subject_name(code), sim, tid)]]
            # The best has no subject (deleted since it was found): walk the others below.
        scores, ids, codes = self.index.search_subjects(probes, n_cand)
        if not ranked:
            scores = self._rescore(probes, ids, score)
        elif k == 1:  # the usual question: the first usable candidate of each row, all rows at once
            return self._top1(scores, ids, codes, threshold)
        return [self._best(scores[p], ids[p], codes[p], k, threshold, ranked) for p in range(len(ids))]

    def _top1(
        self, scores: np.ndarray, ids: np.ndarray, codes: np.ndarray, threshold: float | None
    ) -> list[list[Match]]:
        """`_best` with k = 1 on ranked rows, vectorised over the batch (rows are sorted, so
        the first candidate that has a subject and passes the threshold is the answer). A single
        probe reaches it only when its best candidate had no subject (`_identify_one_key`)."""
        usable = (codes >= 0) & np.isfinite(scores)
        if threshold is not None:
            usable &= scores >= threshold
        first = usable.argmax(axis=1)
        rows = np.arange(len(ids))
        found = usable[rows, first]
        return [
            [Match(self.index.subject_name(int(codes[p, j])), float(scores[p, j]), int(ids[p, j]))]
            if ok else []
            for p, j, ok in zip(rows.tolist(), first.tolist(), found.tolist(), strict=True)
        ]

    def _rescore(self, probes: np.ndarray, ids: np.ndarray, score: ScoreFn) -> np.ndarray:
        """The scheme's own similarity of every candidate (-inf where it has vanished)."""
        out = np.full(ids.shape, -np.inf, np.float32)
        found, vectors = self.index.vectors(np.unique(ids[ids >= 0]))
        row_of = {int(i): r for r, i in enumerate(found.tolist())}
        for p, row in enumerate(ids):
            cols = [j for j, i in enumerate(row.tolist()) if i in row_of]
            if cols:
                rows = [row_of[int(row[j])] for j in cols]
                out[p, cols] = score(probes[p : p + 1], vectors[rows])[0]
        return out

    def _best(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        codes: np.ndarray,
        k: int,
        threshold: float | None,
        ranked: bool = False,
    ) -> list[Match]:
        """`best_subjects` on arrays: each subject by its best template, best first. A walk
        down the ranked candidates that stops at the k-th subject (or the threshold): with
        k = 1 that is the first valid candidate, whatever the number of candidates."""
        if not ranked and len(scores) > 1 and not (scores[:-1] >= scores[1:]).all():
            order = np.argsort(-scores, kind="stable")
            scores, ids, codes = scores[order], ids[order], codes[order]
        out: list[Match] = []
        seen: set[int] = set()
        for sim, tid, code in zip(scores.tolist(), ids.tolist(), codes.tolist(), strict=True):
            if (threshold is not None and sim < threshold) or sim == -np.inf:
                break
            if code < 0 or code in seen:
                continue
            seen.add(code)
            out.append(Match(self.index.subject_name(code), float(sim), int(tid)))
            if len(out) == k:
                break
        return out

    def identify(
        self, probes: ProbeSet | np.ndarray, *, k: int = 1, threshold: float | None = None
    ) -> list[list[Match]]:
        """Per probe, the best `k` subjects (each by its best template), best first, only
        those with similarity >= threshold when one is given. `probes`: a `ProbeSet`, or
        one array when the matcher serves a single key."""
        if isinstance(probes, np.ndarray) and len(self.scorers) == 1:  # the usual request
            if not len(probes):
                return []
            return self._identify_one_key(probes, next(iter(self.scorers.values())), k=k, threshold=threshold)
        probe_set = self._probe_set(probes)
        n = len(next(iter(probe_set.values())))
        if n == 0:
            return []
        if len(self.scorers) == 1:
            kid, templates = next(iter(probe_set.items()))
            return self._identify_one_key(templates, self.scorers[kid], k=k, threshold=threshold)
        scored: list[list[tuple[int, str, float]]] = [[] for _ in range(n)]
        n_cand = max(self.candidates, 5 * k)
        for kid, templates in probe_set.items():
            _, ids = self.index.search(templates, n_cand)
            found = self._candidates(kid, np.unique(ids[ids >= 0]))
            score = self.scorers[kid]
            for p, row in enumerate(ids):
                cand = [int(i) for i in row if int(i) in found]
                if not cand:
                    continue
                sims = score(templates[p : p + 1], np.stack([found[i][1] for i in cand]))[0]
                scored[p].extend(zip(cand, (found[i][0] for i in cand), sims.tolist(), strict=True))
        return [best_subjects(s, k=k, threshold=threshold) for s in scored]

    def verify(self, probes: ProbeSet | np.ndarray, subject: str) -> Match:
        """The best similarity of ONE probe (its first row, under each key) to any template of
        `subject`, each template compared under its own key. SubjectNotFound if absent."""
        probe_set = self._probe_set(probes)
        ids = self.gallery.subject_template_ids(subject, collection=self.collection)
        if not ids:
            self.gallery.get_subject(subject, collection=self.collection)  # raises if absent
            return Match(subject, float("-inf"), -1)
        rows = self.gallery.template_rows(ids)
        scored: list[tuple[int, str, float]] = []
        for kid, probe in probe_set.items():
            mine = [i for i in ids if i in rows and (len(self.scorers) == 1 or rows[i].key_id == kid)]
            if mine:
                vecs = np.stack([rows[i].vector for i in mine])
                sims = self.scorers[kid](np.asarray(probe).reshape(-1, vecs.shape[1])[:1], vecs)[0]
                scored.extend((i, subject, s) for i, s in zip(mine, sims.tolist(), strict=True))
        best = best_subjects(scored, k=1)
        return best[0] if best else Match(subject, float("-inf"), -1)
