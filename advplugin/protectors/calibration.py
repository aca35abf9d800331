"""Calibrated decision thresholds: the score at which a scheme's matcher says "same person",
measured on data at fixed false-match rates (FMR), in the scheme's own scorer's units.

A similarity score means nothing without a threshold, and a threshold means nothing without
the data it was measured on. Every threshold here was measured by one command
(`benchmarks/calibrate.py`, code in `advplugin.evaluation.calibration`) on LFW (`lfw-dev`):
every impostor pair (two different people) and every genuine pair (two photos of one person)
of the 9,949 images, scored by the scheme's keyless scorer (`SchemeInfo.scorer`). The
threshold at FMR f is the smallest 4-decimal number t at which at most a fraction f of the
impostor pairs score >= t (the service's rule: `verified = similarity >= threshold`), so the
rounding errs towards fewer false matches; `fnmr` is the fraction of genuine pairs scoring
below t. LFW's news photos are not a deployment's cameras: treat the numbers as the
starting point a deployment re-measures on its own pairs, not as a guarantee.

Where the numbers live, and why:
- an extractor's raw embeddings (cosine of the L2-normalised vectors) have their own
  calibration, in `EXTRACTOR_CALIBRATIONS` below, keyed by the names of the extractor registry
  (`advplugin.adapters`, which sits above this package and may not be imported here). `dlib`
  and `dlib-torch` compute the same descriptors to 1e-6, so they share one;
- a scheme whose scores ARE the raw cosine (`none`; `xnn` with its default orthogonal matrix:
  an orthogonal map of unit vectors keeps every inner product) uses its extractor's
  calibration unchanged (`Protector.preserves_scores`);
- a trained scheme moves scores by its noise, so it ships thresholds of its own, per
  extractor name and weights version (`Protector.calibrations`, next to the weights'
  SHA-256 in the scheme's module); a weights file of the user's own has none;
- the rest (`onnx`, `insightface`, `callable`: a model the user supplies; `xnn` with a
  Gaussian matrix, whose distortion of scores depends on the key) has no calibration: None.

`calibration_for(scheme, extractor, **options)` answers for any combination.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

#: The false-match rates every calibration is measured at.
FMRS: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)

#: The command that measured every number in this package's calibrations.
COMMAND = ".venv/bin/python benchmarks/calibrate.py"

#: What each calibration's `source` names: the data and how many pairs were counted.
LFW_DEV_PAIRS = (
    "lfw-dev-dlib128.npz (9,949 lfw-dev images, 4,591 people): all 49,399,549 impostor and "
    "86,777 genuine pairs"
)


@dataclass(frozen=True)
class Calibration:
    """Decision thresholds measured on data, in the units of the scheme's scorer.

    `thresholds[f]`: accept a pair as the same person where its score >= this, to falsely
    match at most a fraction f of impostor pairs (on the calibration data). `fnmr[f]`: the
    fraction of genuine pairs rejected at that threshold. `source`: one line naming the data,
    the pairs counted and the command that measured it."""

    thresholds: Mapping[float, float]
    fnmr: Mapping[float, float]
    source: str

    def __post_init__(self) -> None:
        if set(self.thresholds) != set(self.fnmr) or not self.thresholds:
            raise ValueError("a calibration needs a threshold and an FNMR at the same FMRs")
        # Read-only views: a calibration is shared by every caller (the registry's metadata).
        object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))
        object.__setattr__(self, "fnmr", MappingProxyType(dict(self.fnmr)))

    def __hash__(self) -> int:  # the mappings are read-only views: hash their items
        return hash((tuple(sorted(self.thresholds.items())), tuple(sorted(self.fnmr.items())), self.source))

    @property
    def fmrs(self) -> tuple[float, ...]:
        """The calibrated false-match rates, smallest first."""
        return tuple(sorted(self.thresholds))

    def _fmr(self, fmr: float) -> float:
        for calibrated in self.thresholds:
            if math.isclose(float(fmr), calibrated, rel_tol=1e-9):
                return calibrated
        valid = ", ".join(f"{f:g}" for f in self.fmrs)
        raise ValueError(f"no threshold calibrated at FMR {fmr!r}; calibrated FMRs: {valid}")

    def threshold(self, fmr: float) -> float:
        """The score threshold at false-match rate `fmr` (one of `fmrs`; ValueError naming them
        for any other value)."""
        return self.thresholds[self._fmr(fmr)]

    def fnmr_at(self, fmr: float) -> float:
        """The false non-match rate measured at `threshold(fmr)`."""
        return self.fnmr[self._fmr(fmr)]


def measured(
    thresholds: tuple[float, ...], fnmr: tuple[float, ...], *, data: str = LFW_DEV_PAIRS, what: str
) -> Calibration:
    """A calibration from `benchmarks/calibrate.py`'s table: one threshold and one FNMR per
    FMR of `FMRS`, in that order (largest FMR first)."""
    if not len(thresholds) == len(fnmr) == len(FMRS):
        raise ValueError(f"need {len(FMRS)} thresholds and FNMRs, one per FMR {FMRS}")
    return Calibration(
        thresholds=dict(zip(FMRS, thresholds, strict=True)),
        fnmr=dict(zip(FMRS, fnmr, strict=True)),
        source=f"{data}; {what}; measured by `{COMMAND}`",
    )


#: dlib's 128-d descriptors (`face-recognition-models` 0.3.0), cosine of the unit vectors.
DLIB128 = measured(
    (0.9073, 0.9258, 0.9404, 0.9526),
    (0.0085, 0.0484, 0.1818, 0.4438),
    what="cosine of the raw dlib descriptors",
)

#: Raw-embedding calibrations by extractor name: the names `advplugin.adapters` registers
#: (`advplugin list`). An extractor missing here has none (a user-supplied model).
EXTRACTOR_CALIBRATIONS: Mapping[str, Calibration] = MappingProxyType(
    {"dlib": DLIB128, "dlib-torch": DLIB128}
)

#: The extractors computing dlib's descriptors: what the trained schemes' 128-d weights were
#: trained and calibrated on (the same descriptors to 1e-6, so the same thresholds).
DLIB_EXTRACTORS: tuple[str, ...] = ("dlib", "dlib-torch")


def extractor_calibration(extractor: str) -> Calibration | None:
    """The calibration of an extractor's raw embeddings (cosine), or None."""
    return EXTRACTOR_CALIBRATIONS.get(extractor)


def calibration_for(scheme: str, extractor: str, **scheme_options: object) -> Calibration | None:
    """The decision thresholds of `scheme` (with `scheme_options`) on templates of
    `extractor`'s embeddings, or None where nothing was measured for that combination.

    An unknown scheme name, or options the scheme refuses, fail with `ValueError` as
    `create_protector` would; any extractor name without a calibration gives None (this
    package cannot see the extractor registry, which sits above it)."""
    # Function-local: base imports this module for the `Calibration` type.
    from advplugin.protectors.base import scheme_info

    return scheme_info(scheme).calibration(extractor, **scheme_options)
