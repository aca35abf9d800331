"""Measuring decision thresholds: the score at fixed false-match rates (FMR) of a scorer on a
labelled set of templates, and the false non-match rate (FNMR) there.

Every pair is counted, not a sample: scores are computed a block of rows at a time against
the rows after them (the upper triangle, each unordered pair once; `block` rows x N scores in
memory), genuine scores are all kept, and of the impostor scores only the largest ones the
largest FMR needs (per block, then overall), so 50 million impostor pairs cost a few seconds
and a few megabytes. The scorer is the scheme's own `(probes, gallery) -> [P, G]` function,
so a matcher that is not a cosine is measured the same way.

Conventions (those of `advplugin.protectors.calibration`, whose numbers this produces): a pair
is accepted where its score >= threshold (the service's `verified`); the threshold at FMR f is
the smallest number, rounded UP to `digits` decimals, at which at most floor(f * impostor
pairs) impostor pairs are accepted; FMR and FNMR are then measured at the rounded threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from advplugin.evaluation.metrics import read_pairs, ten_fold_accuracy
from advplugin.evaluation.pairs_report import pair_scores
from advplugin.protectors.base import ScoreFn
from advplugin.protectors.calibration import FMRS, Calibration, measured


def pair_counts(identity: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) unordered pairs of a labelled set."""
    _, counts = np.unique(identity, return_counts=True)
    n = int(counts.sum())
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, n * (n - 1) // 2 - genuine


@dataclass(frozen=True)
class PairTails:
    """Every genuine score, and the largest impostor scores, of all pairs of a set."""

    genuine: np.ndarray  # float64, every genuine pair
    impostor_top: np.ndarray  # float64, descending: the largest impostor scores
    impostor_pairs: int  # how many impostor pairs were scored

    def exact_threshold(self, fmr: float) -> float:
        """The impostor score t with at most floor(fmr * pairs) impostor scores above it."""
        allowed = math.floor(fmr * self.impostor_pairs)
        if allowed >= len(self.impostor_top):
            raise ValueError(f"FMR {fmr:g} needs more of the largest impostor scores kept")
        return float(self.impostor_top[allowed])

    def fmr_at(self, threshold: float) -> float:
        """Fraction of impostor pairs accepted (score >= threshold); exact for thresholds at
        or above the smallest kept impostor score."""
        if threshold < self.impostor_top[-1]:
            raise ValueError("threshold below the kept impostor scores: FMR not known exactly")
        accepted = int(np.count_nonzero(self.impostor_top >= threshold))
        return accepted / self.impostor_pairs

    def fnmr_at(self, threshold: float) -> float:
        """Fraction of genuine pairs rejected (score < threshold)."""
        return float(np.mean(self.genuine < threshold))


def pair_tails(
    score_fn: ScoreFn,
    templates: np.ndarray,
    identity: np.ndarray,
    *,
    max_fmr: float = max(FMRS),
    block: int = 1024,
) -> PairTails:
    """Score every unordered pair of `templates` (rows labelled by `identity`) with
    `score_fn`, keeping every genuine score and the impostor scores that thresholds up to
    `max_fmr` need."""
    identity = np.asarray(identity)
    _, codes = np.unique(identity, return_inverse=True)
    _, impostor_pairs = pair_counts(identity)
    if impostor_pairs == 0:
        raise ValueError("a calibration needs at least two people")
    keep = min(impostor_pairs, math.floor(max_fmr * impostor_pairs) + 1)
    n = len(templates)
    genuine, top = [], []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        cols = np.arange(start, n)
        s = np.asarray(score_fn(templates[rows], templates[start:]), np.float32)
        upper = cols[None, :] > rows[:, None]
        same = codes[rows][:, None] == codes[cols][None, :]
        genuine.append(s[upper & same])
        impostor = s[upper & ~same]
        if len(impostor) > keep:
            impostor = np.partition(impostor, len(impostor) - keep)[-keep:]
        top.append(impostor)
    impostor_top = np.sort(np.concatenate(top))[::-1][:keep]
    return PairTails(
        genuine=np.concatenate(genuine).astype(np.float64),
        impostor_top=impostor_top.astype(np.float64),
        impostor_pairs=impostor_pairs,
    )


def round_up(x: float, digits: int) -> float:
    """x rounded up to `digits` decimals (a threshold rounded up accepts no more impostors)."""
    scale = 10**digits
    return math.ceil(round(x * scale, 6)) / scale


@dataclass(frozen=True)
class Measured:
    """One scorer's calibration as measured: per FMR, the shipped (rounded) threshold, the
    exact one, and the FMR and FNMR at the shipped one."""

    fmrs: tuple[float, ...]
    thresholds: tuple[float, ...]
    exact_thresholds: tuple[float, ...]
    fmr: tuple[float, ...]
    fnmr: tuple[float, ...]
    genuine_pairs: int
    impostor_pairs: int

    def as_dict(self) -> dict[str, object]:
        return {
            f"{f:g}": {
                "threshold": t, "exact_threshold": e, "fmr_measured": m, "fnmr": r,
                "impostors_accepted": round(m * self.impostor_pairs),
            }
            for f, t, e, m, r in zip(
                self.fmrs, self.thresholds, self.exact_thresholds, self.fmr, self.fnmr, strict=True
            )
        } | {"genuine_pairs": self.genuine_pairs, "impostor_pairs": self.impostor_pairs}

    def calibration(self, *, what: str, data: str | None = None) -> Calibration:
        """The `Calibration` to ship (FNMR rounded to 4 decimals)."""
        if self.fmrs != FMRS:
            raise ValueError(f"a shipped calibration is measured at FMRs {FMRS}")
        fnmr = tuple(round(r, 4) for r in self.fnmr)
        extra = {} if data is None else {"data": data}
        return measured(self.thresholds, fnmr, what=what, **extra)


def measure(tails: PairTails, fmrs: Sequence[float] = FMRS, *, digits: int = 4) -> Measured:
    """Thresholds at `fmrs` (rounded up to `digits` decimals) and the rates at them."""
    exact = tuple(tails.exact_threshold(f) for f in fmrs)
    shipped = tuple(round_up(t, digits) for t in exact)
    return Measured(
        fmrs=tuple(fmrs),
        thresholds=shipped,
        exact_thresholds=exact,
        fmr=tuple(tails.fmr_at(t) for t in shipped),
        fnmr=tuple(tails.fnmr_at(t) for t in shipped),
        genuine_pairs=len(tails.genuine),
        impostor_pairs=tails.impostor_pairs,
    )


def impostor_rate(
    score_fn: ScoreFn, templates: np.ndarray, identity: np.ndarray, threshold: float
) -> tuple[float, int]:
    """(fraction of impostor pairs scoring >= threshold, impostor pairs): every unordered
    pair of a (small) set, a check of a shipped threshold on other data."""
    tails = pair_tails(score_fn, templates, identity, max_fmr=1.0)
    return float(np.count_nonzero(tails.impostor_top >= threshold)) / tails.impostor_pairs, (
        tails.impostor_pairs
    )


def ten_fold(
    score_fn: ScoreFn, templates: np.ndarray, paths: np.ndarray, pairs_file: str
) -> tuple[float, float]:
    """LFW's 10-fold verification accuracy (mean, std) on an LFW-format pairs file."""
    protocol = read_pairs(pairs_file)
    index = {str(p): i for i, p in enumerate(paths)}
    left = templates[[index[p] for p in protocol.left]]
    right = templates[[index[p] for p in protocol.right]]
    return ten_fold_accuracy(pair_scores(score_fn, left, right), protocol.same, protocol.fold)
