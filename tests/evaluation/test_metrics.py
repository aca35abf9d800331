"""Metrics on small data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.evaluation.metrics import (
    d_sys,
    local_linkability,
    psnr,
    rank1_identification,
    roc_curve,
    ssim,
    tar_at_far,
    ten_fold_accuracy,
)


def test_perfect_matcher_scores_100_percent() -> None:
    rng = np.random.default_rng(0)
    same = rng.random(600) < 0.5
    scores = np.where(same, 0.9, 0.1) + rng.normal(0, 0.01, 600)
    fold = np.arange(600) // 60
    accuracy, std = ten_fold_accuracy(scores, same, fold)
    assert accuracy == 1.0 and std == 0.0
    assert tar_at_far(scores[same], scores[~same], 1e-3) == 1.0


def test_chance_matcher_is_near_50_percent() -> None:
    rng = np.random.default_rng(1)
    same = rng.random(6000) < 0.5
    accuracy, _ = ten_fold_accuracy(rng.random(6000), same, np.arange(6000) // 600)
    assert 0.45 < accuracy < 0.55


def test_tar_at_far_counts_impostors_above_threshold() -> None:
    impostor = np.arange(1000, dtype=float)  # threshold at FAR 1e-2 leaves 10 impostors above
    genuine = np.array([985.5, 995.5, 1000.5, 2000.0])
    assert tar_at_far(genuine, impostor, 1e-2) == 0.75
    _fars, tars = roc_curve(genuine, impostor)
    assert np.all(np.diff(tars) >= 0) and tars[-1] == 1.0


def test_rank1_identification() -> None:
    scores = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.8]])
    assert rank1_identification(scores, np.array(["a", "c"]), np.array(["a", "b", "c"])) == 1.0
    assert rank1_identification(scores, np.array(["b", "c"]), np.array(["a", "b", "c"])) == 0.5


def test_dsys_fully_separated_is_one() -> None:
    rng = np.random.default_rng(2)
    assert d_sys(rng.normal(5, 0.1, 2000), rng.normal(0, 1, 20000)) == pytest.approx(1.0)


def test_dsys_identical_mated_scores_is_one() -> None:
    """Perfect linkage: every mated pair scores the same top value, above all non-mated."""
    rng = np.random.default_rng(3)
    assert d_sys(np.ones(500), rng.uniform(-1, 0.5, 20000)) == pytest.approx(1.0)


def test_dsys_independent_scores_is_near_zero() -> None:
    rng = np.random.default_rng(4)
    value = d_sys(rng.normal(0, 1, 20000), rng.normal(0, 1, 200000))
    assert 0.0 <= value < 0.05


def test_dsys_grows_with_separation() -> None:
    rng = np.random.default_rng(5)
    non_mated = rng.normal(0, 1, 50000)
    values = [d_sys(rng.normal(shift, 1, 5000), non_mated) for shift in (0.0, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[-1] > 0.9


def test_local_linkability_is_a_probability_difference() -> None:
    rng = np.random.default_rng(6)
    _, local, _p_m = local_linkability(rng.normal(1, 1, 5000), rng.normal(0, 1, 5000))
    assert np.all((local >= 0) & (local <= 1))
    # Where mated scores are rare relative to non-mated (the left tail), D is 0.
    assert local[: len(local) // 4].max() == 0.0


def test_ssim_and_psnr_known_values() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert np.allclose(ssim(x, x), 1.0)
    assert np.all(np.isinf(psnr(x, x)))
    shifted = x.astype(float) + 5.0  # MSE 25
    assert np.allclose(psnr(x, shifted), 10 * np.log10(255**2 / 25))
    noisy = np.clip(x + rng.normal(0, 60, x.shape), 0, 255)
    assert np.all(ssim(x, noisy) < 0.8)
    with pytest.raises(ValueError):
        d_sys(np.array([]), np.ones(3))
