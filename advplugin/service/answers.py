"""The answer policy: the one place where a similarity or a match decision becomes an answer.

Why: every exact similarity that an API client receives is one linear equation in an enrolled
person's template. An identify-scoped key that sends ~800 photos of *other* people recovers
the enrolled people by least squares (docs/service.md, "What an answer reveals"). Even bare
decisions leak, through look-alikes. So by default a key is answered with **decisions, not
measurements**:

* only subjects whose score passes the collection's operating point (a threshold calibrated on
  LFW pairs at a false match rate, `advplugin.protectors.calibration_for`);
* at most `max_predictions` subjects per face (1 by default), whatever `prediction_count` asks;
* a band value instead of the score: 0.85 for a match at FMR 1e-2, 0.90 at 1e-3, 0.95 at
  1e-4, 0.99 at 1e-5 (`BAND_VALUES`). A non-match carries no score;
* a budget per key (`advplugin.gallery.budgets`): faces that matched no one, and weak matches
  that name someone new to the key. Over budget, 429 with Retry-After and an audit event.

A key granted `exact_scores` by an admin (`advplugin db api-key set NAME --exact-scores`,
audited) is answered as before: exact similarities, up to 100 subjects, its own threshold, no
budget. Such a key can read the gallery back out of the scores; grant it for evaluation and
analytics only.

Every route that answers a similarity or a decision takes `Answers` (the dependency
`advplugin.service.deps.AnswersFor`), and gets its matches *through* it. A test over the app's
routes (`tests/service/test_answers.py`) fails when a route that answers a similarity does
not.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from advplugin.gallery import Gallery
from advplugin.gallery.budgets import AnswerBudgets, BudgetLimits, Charge, OperatingPoints, Outcome
from advplugin.gallery.matcher import ProbeSet
from advplugin.protectors import Calibration, calibration_for
from advplugin.service.auth import Caller
from advplugin.service.collection_service import CollectionService
from advplugin.service.errors import ServiceError
from advplugin.service.protection import ConfigurationError, KeyView, Protection
from advplugin.settings import AnswerSettings, Settings

#: The similarity an answer carries for a match, by the strictest calibrated FMR it passes.
#: A CompreFace client's own threshold keeps its sense: 0.85 accepts every match at the
#: default operating point (FMR 1e-2), 0.95 only those at FMR 1e-4 or stricter.
BAND_VALUES: dict[float, float] = {1e-2: 0.85, 1e-3: 0.90, 1e-4: 0.95, 1e-5: 0.99}
#: Band value of a match decided by an explicit threshold whose FMR is unknown.
DEFAULT_BAND = 0.85
#: Seconds a collection's operating point is cached (a change takes effect within this).
_POINT_TTL = 5.0


@dataclass(frozen=True)
class OperatingPoint:
    """Where a collection decides: `threshold` (score units of the scheme's scorer), the bands
    ((score threshold, band value), ascending) and the strong threshold (budget credit)."""

    threshold: float
    bands: tuple[tuple[float, float], ...]
    strong: float

    def band(self, score: float) -> float:
        value = 0.0
        for t, v in self.bands:
            if score >= t:
                value = v
        return value


def operating_point(calibration: Calibration | None, fmr: float, answers: AnswerSettings) -> OperatingPoint:
    """The operating point at `fmr` (ConfigurationError where it cannot be decided)."""
    calibrated = dict(calibration.thresholds) if calibration is not None else {}
    if answers.decision_threshold is not None:
        threshold = float(answers.decision_threshold)
        value = BAND_VALUES.get(fmr, DEFAULT_BAND) if fmr in calibrated else DEFAULT_BAND
    elif fmr in calibrated:
        threshold, value = float(calibrated[fmr]), BAND_VALUES.get(fmr, DEFAULT_BAND)
    else:
        offered = ", ".join(f"{f:g}" for f in sorted(calibrated)) or "none (this scheme and extractor ship no calibration)"
        raise ConfigurationError(
            f"no calibrated decision threshold at FMR {fmr:g}; calibrated: {offered}. Choose one of those "
            "(ADVPLUGIN_ANSWERS__DECISION_FMR) or set ADVPLUGIN_ANSWERS__DECISION_THRESHOLD in the scheme's score units"
        )
    stricter = sorted((float(t), BAND_VALUES[f]) for f, t in calibrated.items()
                      if f in BAND_VALUES and t > threshold and BAND_VALUES[f] > value)
    bands = ((threshold, value), *stricter)
    strong = calibrated.get(answers.strong_fmr)
    return OperatingPoint(threshold, bands, float(strong) if strong is not None else float("inf"))


class Disclosed(NamedTuple):
    """A subject as an answer names it: exact similarity for an exact-scores key, else its band."""

    subject: str
    similarity: float


class Verdict(NamedTuple):
    """A verification as answered: the decision, and a similarity where one may be said
    (exact-scores keys: the score; others: the band of a match, None for a non-match)."""

    verified: bool
    similarity: float | None


class AnswerPolicy:
    """One per service: the calibration of the served scheme and extractor, the operating
    point of each collection (cached a few seconds), the budgets, and counters for /metrics."""

    def __init__(self, gallery: Gallery, protection: Protection, collections: CollectionService,
                 settings: Settings) -> None:
        self.settings = settings.answers
        self.collections = collections
        e = protection.expected
        self.calibration = calibration_for(e.scheme, protection.extractor_name, **settings.scheme_options)
        self.default = operating_point(self.calibration, self.settings.decision_fmr, self.settings)
        self.budgets = AnswerBudgets(gallery)
        self.points = OperatingPoints(gallery)
        self._points: dict[str, tuple[float, OperatingPoint]] = {}
        self._lock = threading.Lock()
        #: (outcome, collection) -> count: "strong", "weak", "unmatched", "refused".
        self.counts: Counter[tuple[str, str]] = Counter()

    def point(self, collection: str) -> OperatingPoint:
        now = time.monotonic()
        cached = self._points.get(collection)
        if cached is not None and cached[0] > now:
            return cached[1]
        fmr = self.points.get(collection)
        try:
            point = self.default if fmr is None else operating_point(self.calibration, fmr, self.settings)
        except ConfigurationError as err:  # set for another scheme: refuse to answer, clearly
            raise ServiceError(503, "operating_point", str(err)) from None
        with self._lock:
            self._points[collection] = (now + _POINT_TTL, point)
        return point

    def limits(self, caller: Caller) -> BudgetLimits:
        s = self.settings
        return BudgetLimits(
            window_hours=s.budget_window_hours,
            unmatched=s.budget_unmatched if caller.budget_unmatched is None else caller.budget_unmatched,
            lookalikes=s.budget_lookalikes if caller.budget_lookalikes is None else caller.budget_lookalikes,
            credit_per_strong=s.budget_credit_per_strong,
        )

    def count(self, outcome: str, collection: str, n: int = 1) -> None:
        with self._lock:  # requests run in threads; the metrics read this Counter
            self.counts[outcome, collection] += n

    def counted(self) -> list[tuple[tuple[str, str], int]]:
        """((outcome, collection), count) of everything answered so far, for /metrics."""
        with self._lock:
            return sorted(self.counts.items())

    def refuse(self, caller: Caller, charge: Charge) -> ServiceError:
        self.count("refused", caller.collection)
        return ServiceError(
            429, "budget_exceeded",
            f"this API key's answer budget is used up ({', '.join(charge.over)}); "
            f"retry after {charge.retry_after} s or ask an admin to raise it",
            headers={"retry-after": str(charge.retry_after)},
        )

    def bind(self, caller: Caller) -> Answers:
        return Answers(self, caller)


class Answers:
    """The policy bound to one request's caller: what routes get matches and verdicts from."""

    def __init__(self, policy: AnswerPolicy, caller: Caller) -> None:
        self.policy = policy
        self.caller = caller

    @property
    def exact(self) -> bool:
        return self.caller.exact_scores

    def admit(self) -> None:
        """Refuse (429) a key whose budget is used up before its image is extracted (a read;
        the charge after matching decides anyway, so routes without extraction skip this)."""
        if self.exact:
            return
        p = self.policy
        limits = p.limits(self.caller)
        usage = p.budgets.usage(self.caller.api_key_id, limits)
        if usage.over(limits):
            raise p.refuse(self.caller, p.budgets.charge(self.caller.api_key_id, self.caller.collection, [], limits))

    def _charge(self, outcomes: Sequence[Outcome]) -> None:
        p, c = self.policy, self.caller
        charge = p.budgets.charge(c.api_key_id, c.collection, outcomes, p.limits(c))
        if charge.refused:
            raise p.refuse(c, charge)
        for o in outcomes:
            p.count("unmatched" if o.subject is None else "strong" if o.strong else "weak", c.collection)

    def identify(
        self, view: KeyView, collection: str, probes: ProbeSet, *, prediction_count: int, threshold: float | None
    ) -> list[list[Disclosed]]:
        """The subjects each probe may be told. Exact-scores keys: the `prediction_count` most
        similar (at least `threshold`) with their scores. Others: the best match above the
        operating point (at most `max_predictions`), its band value (at least `threshold`,
        compared with the band), counted against the key's budget."""
        if self.exact:
            found = self.policy.collections.identify(view, collection, probes, k=prediction_count, threshold=threshold)
            return [[Disclosed(m.subject, m.similarity) for m in ms] for ms in found]
        point = self.policy.point(collection)
        k = min(prediction_count, self.policy.settings.max_predictions)
        found = self.policy.collections.identify(view, collection, probes, k=k, threshold=point.threshold)
        # One outcome per subject named (each is a disclosure), one per face that matched no one.
        self._charge([o for ms in found for o in (
            [Outcome(m.subject, m.similarity >= point.strong) for m in ms] or [Outcome(None)])])
        floor = -float("inf") if threshold is None else threshold
        return [[d for d in (Disclosed(m.subject, point.band(m.similarity)) for m in ms) if d.similarity >= floor]
                for ms in found]

    def verify(self, collection: str, subject: str, scores: Sequence[float],
               *, threshold: float | None = None) -> list[Verdict]:
        """Verdicts of probes against one stored subject (verification by name or by image
        id): a per-person oracle, so counted like identification (a failed verification is
        an unmatched face, a weak match a look-alike of that subject)."""
        point = self.policy.point(collection)
        if self.exact:
            cut = point.threshold if threshold is None else threshold
            return [Verdict(bool(s >= cut), float(s)) for s in scores]
        self._charge([Outcome(subject, s >= point.strong) if s >= point.threshold else Outcome(None)
                             for s in scores])
        return [self._verdict(point, s) for s in scores]

    def compare(self, collection: str, scores: Sequence[float]) -> list[Verdict]:
        """Verdicts of faces of two uploaded images against each other: no stored template is
        involved, so nothing about the gallery can leak and no budget is counted. The same
        bands all the same (the caller could otherwise learn the scheme's exact scores)."""
        point = self.policy.point(collection)
        if self.exact:
            return [Verdict(bool(s >= point.threshold), float(s)) for s in scores]
        return [self._verdict(point, s) for s in scores]

    @staticmethod
    def _verdict(point: OperatingPoint, score: float) -> Verdict:
        return Verdict(True, point.band(score)) if score >= point.threshold else Verdict(False, None)


__all__ = ["BAND_VALUES", "AnswerPolicy", "Answers", "Disclosed", "OperatingPoint", "Verdict", "operating_point"]
