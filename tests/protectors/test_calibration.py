"""Calibrated decision thresholds (`advplugin.protectors.calibration`): every registered scheme
ships thresholds for dlib's embeddings (or says here why it cannot), they are ordered as FMRs
are, only calibrated FMRs are answered, the options that change scores change the answer,
and - on the face data - the shipped FMR 1e-3 threshold does falsely match about 1e-3 of
impostor pairs of a sample it was not computed on as a sample."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from advplugin.adapters import list_extractors
from advplugin.evaluation.calibration import impostor_rate, measure, pair_counts, pair_tails
from advplugin.keys import Key
from advplugin.protectors import (
    Calibration,
    calibration_for,
    create_protector,
    list_schemes,
    scheme_info,
)
from advplugin.protectors.calibration import (
    COMMAND,
    DLIB_EXTRACTORS,
    EXTRACTOR_CALIBRATIONS,
    FMRS,
    extractor_calibration,
)

DIM = 128
SCHEMES = list_schemes()
#: A registered scheme that cannot have a calibration for dlib's embeddings, with the reason.
#: Empty: every scheme has one (a new scheme must measure its own or be listed here).
UNCALIBRATED: dict[str, str] = {}
#: Extractors whose embeddings come from a model the user supplies: nothing to measure.
USER_MODELS = ("onnx", "insightface", "callable")


def test_extractor_table_names_registered_extractors() -> None:
    """The raw calibrations are keyed by the extractor registry's names (protectors cannot
    import adapters, so the test checks the two agree)."""
    assert set(EXTRACTOR_CALIBRATIONS) <= set(list_extractors())
    assert set(DLIB_EXTRACTORS) <= set(list_extractors())
    # dlib-torch computes dlib's descriptors to 1e-6: one calibration for both.
    assert extractor_calibration("dlib") is extractor_calibration("dlib-torch") is not None
    for name in USER_MODELS:
        assert name in list_extractors() and extractor_calibration(name) is None


@pytest.mark.parametrize("extractor", DLIB_EXTRACTORS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_calibrated_for_dlib(scheme: str, extractor: str) -> None:
    calibration = calibration_for(scheme, extractor)
    if scheme in UNCALIBRATED:
        assert calibration is None, f"{scheme} has a calibration now: drop it from UNCALIBRATED"
        return
    assert calibration is not None, f"{scheme} ships no thresholds for {extractor}"
    assert scheme_info(scheme).calibration(extractor) is calibration
    # Schemes that keep raw cosine scores use the extractor's; the others their own.
    preserved = scheme_info(scheme).protector.preserves_scores
    assert (calibration is extractor_calibration(extractor)) == preserved


@pytest.mark.parametrize("scheme", SCHEMES)
def test_user_supplied_or_unknown_extractors_have_none(scheme: str) -> None:
    for extractor in (*USER_MODELS, "no-such-extractor"):
        assert calibration_for(scheme, extractor) is None


@pytest.mark.parametrize("scheme", sorted(set(SCHEMES) - set(UNCALIBRATED)))
def test_thresholds_are_ordered_and_only_calibrated_fmrs_answer(scheme: str) -> None:
    calibration = calibration_for(scheme, "dlib")
    assert isinstance(calibration, Calibration)
    assert calibration.fmrs == tuple(sorted(FMRS))
    by_growing_fmr = [calibration.threshold(f) for f in sorted(FMRS)]
    assert all(a > b for a, b in pairwise(by_growing_fmr))
    fnmr = [calibration.fnmr[f] for f in sorted(FMRS)]
    assert all(0 <= r <= 1 for r in fnmr)
    assert all(a >= b for a, b in pairwise(fnmr))  # stricter: more rejected
    assert -1.0 <= by_growing_fmr[-1] and by_growing_fmr[0] <= 1.0  # cosine units
    assert calibration.threshold(0.001) == calibration.threshold(1e-3)  # the same float
    with pytest.raises(ValueError, match=r"calibrated FMRs: 1e-05, 0\.0001, 0\.001, 0\.01"):
        calibration.threshold(0.5)
    assert COMMAND in calibration.source and "impostor" in calibration.source
    assert "\n" not in calibration.source
    with pytest.raises(TypeError):
        calibration.thresholds[1e-3] = 0.0  # type: ignore[index]  # shared metadata: read-only


@pytest.mark.parametrize(
    ("scheme", "options", "expect"),
    [
        # A Gaussian matrix distorts cosine by a key-dependent amount: nothing to ship.
        ("xnn", {"matrix": "gaussian"}, "none"),
        ("xnn", {"matrix": "orthogonal"}, "raw"),
        ("advface", {"version": 1}, "default"),
        ("advface", {"version": 2}, "own"),
        # The key's orthogonal transform does not change scores.
        ("advface", {"transform": "none"}, "default"),
        # Per-template refinement moves scores beyond the generator's: never measured.
        ("advface", {"refine_steps": 1}, "none"),
        ("advface", {"weights": "my-advface.npz"}, "none"),
        ("xnn-d", {"release": 2}, "default"),
        ("xnn-d", {"release": 1}, "own"),
        ("xnn-d", {"weights": "my-xnnd.npz"}, "none"),
    ],
)
def test_options_that_change_scores_change_the_calibration(
    scheme: str, options: dict[str, object], expect: str
) -> None:
    got = calibration_for(scheme, "dlib", **options)
    default = calibration_for(scheme, "dlib")
    if expect == "none":
        assert got is None
    elif expect == "raw":
        assert got is extractor_calibration("dlib")
    elif expect == "default":
        assert got is default
    else:
        assert got is not None and got is not default
        assert got.thresholds != default.thresholds  # type: ignore[union-attr]


def test_unknown_scheme_or_bad_options_fail_like_create_protector() -> None:
    with pytest.raises(ValueError, match="available"):
        calibration_for("no-such-scheme", "dlib")
    with pytest.raises(ValueError, match="release"):
        calibration_for("xnn-d", "dlib", release=99)


def test_measurement_counts_every_pair_exactly() -> None:
    """`pair_tails` + `measure` against brute force on a small labelled set."""
    rng = np.random.default_rng(3)
    identity = rng.integers(0, 40, size=300).astype(str)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[:, 0] += 3 * (identity.astype(int) % 5)  # some structure, not needed for exactness
    score = scheme_info("none").scorer(16)
    tails = pair_tails(score, x, identity, max_fmr=0.1, block=64)
    s = score(x, x)
    iu = np.triu_indices(len(x), k=1)
    same = (identity[:, None] == identity[None, :])[iu]
    impostor = np.sort(s[iu][~same])[::-1]
    assert (len(tails.genuine), tails.impostor_pairs) == pair_counts(identity) == (same.sum(), (~same).sum())
    np.testing.assert_allclose(np.sort(tails.genuine), np.sort(s[iu][same]), atol=1e-6)
    m = measure(tails, (1e-2, 1e-1))
    for f, t, fmr, fnmr in zip(m.fmrs, m.thresholds, m.fmr, m.fnmr, strict=True):
        assert fmr == pytest.approx((impostor >= t).mean()) and fmr <= f
        assert fnmr == pytest.approx((s[iu][same] < t).mean())
        assert round(t, 4) == t and t - 1e-4 < m.exact_thresholds[m.fmrs.index(f)] <= t


@pytest.mark.parametrize("scheme", ["xnn", "advface"])
def test_shipped_threshold_falsely_matches_about_its_fmr(
    scheme: str, lfw_cache: dict[str, np.ndarray], key: Key
) -> None:
    """On 3,000 random lfw-dev images (about 4.5 M impostor pairs) under a fresh key, the
    impostor rate at the shipped FMR 1e-3 threshold is within a factor 2 of 1e-3 (over 20
    samples it ranges 0.86e-3 to 1.2e-3; a threshold of another FMR is 10x off)."""
    pick = np.sort(np.random.default_rng(2024).choice(len(lfw_cache["embedding"]), 3000, replace=False))
    raw, identity = lfw_cache["embedding"][pick], lfw_cache["identity"][pick]
    calibration = calibration_for(scheme, "dlib")
    assert calibration is not None
    templates = create_protector(scheme, key=key, dim=DIM).protect(raw)
    rate, pairs = impostor_rate(scheme_info(scheme).scorer(DIM), templates, identity, calibration.threshold(1e-3))
    assert pairs > 4_000_000
    assert 0.5e-3 <= rate <= 2e-3, f"{scheme}: impostor rate {rate:.2e} at the FMR 1e-3 threshold"
