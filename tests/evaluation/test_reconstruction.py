"""The reconstruction attacker's pieces that need no photos: the validation split of the train
people, the judge's success attack rates, the operating-point keys and the recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest

from advplugin.evaluation.attacks import verification_success
from advplugin.evaluation.recipe import AttackRecipe, far_key
from advplugin.evaluation.reconstruction import (
    JudgeScorer,
    ReconstructionJudge,
    other_photo,
    validation_split,
)


def _people(n_people: int, photos: int) -> np.ndarray:
    return np.repeat([f"person_{i:03d}" for i in range(n_people)], photos)


def test_validation_split_holds_out_whole_people() -> None:
    identity = _people(200, 3)
    fit, val = validation_split(identity, 0.25)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(identity)))
    assert not set(identity[fit]) & set(identity[val])  # nobody on both sides
    assert 0.15 < len(set(identity[val])) / 200 < 0.35
    again = validation_split(identity[::-1], 0.25)[1]  # by name, not by position
    assert set(identity[::-1][again]) == set(identity[val])


def test_no_validation_when_it_would_empty_a_side() -> None:
    identity = _people(50, 2)
    for fraction in (0.0, 1.0):
        fit, val = validation_split(identity, fraction)
        assert len(val) == 0 and len(fit) == len(identity)


def test_other_photo_is_another_photo_of_the_same_person() -> None:
    identity = np.array(["a", "b", "a", "c", "b", "a", "c"])
    rows = np.arange(len(identity))
    other = other_photo(identity, rows)
    assert (identity[other] == identity).all()
    assert (other != rows).all()
    assert other.tolist() == [2, 4, 5, 6, 1, 0, 3]  # the next photo, cyclically


def _judge(seed: int = 0) -> tuple[ReconstructionJudge, np.ndarray, np.ndarray]:
    """Photos of 60 people, 3 each, whose 'recognition model' reads the photo's number from
    its first pixel and returns that photo's embedding: clustered by person."""
    rng = np.random.default_rng(seed)
    identity = _people(60, 3)
    centres = rng.normal(size=(60, 32))
    references = np.repeat(centres, 3, axis=0) + 0.35 * rng.normal(size=(180, 32))
    crops = np.zeros((180, 4, 4, 3), np.uint8)
    crops[:, 0, 0, 0], crops[:, 0, 0, 1] = np.arange(180) % 256, np.arange(180) // 256

    def embed(images: np.ndarray) -> np.ndarray:
        return references[images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)]

    attacked = np.arange(0, 180, 2)
    judge = ReconstructionJudge(
        crops, identity, attacked, other_photo(identity, attacked),
        [JudgeScorer("model", embed, references)], rng, max_impostors=100_000,
    )  # fmt: skip
    return judge, crops, attacked


def test_judge_rates_real_photos_at_each_operating_point() -> None:
    judge, crops, attacked = _judge()
    assert list(judge.thresholds["model"]) == ["1e-3", "1e-2"]
    assert judge.thresholds["model"]["1e-3"] >= judge.thresholds["model"]["1e-2"]
    got = judge(crops[attacked])  # "reconstructions" that are the attacked photos themselves
    assert got["images"] == len(attacked) and math.isinf(got["psnr"])
    for key, rates in got["model"].items():  # type: ignore[union-attr]
        assert rates["accepted_same_photo"] == 1.0  # identical embedding
        assert rates["accepted_other_photo"] == pytest.approx(
            judge.real_photos["model"][key]["tar_at_far"], abs=0.15
        )
        assert rates["false_accept"] <= 0.1


def test_judge_does_not_accept_someone_else() -> None:
    judge, crops, attacked = _judge(1)
    shifted = crops[(attacked + 3) % len(crops)]  # a photo of the next person
    rates = judge(shifted)["model"]["1e-2"]  # type: ignore[index]
    assert rates["accepted_other_photo"] <= 0.1 and rates["accepted_same_photo"] <= 0.1


def test_verification_success_counts_estimates_past_each_threshold() -> None:
    rng = np.random.default_rng(2)
    refs = rng.normal(size=(50, 16))
    thresholds = {"1e-3": 0.9, "1e-2": 0.5}
    assert verification_success(refs * 3.0, refs, thresholds) == {"1e-3": 1.0, "1e-2": 1.0}
    assert verification_success(-refs, refs, thresholds) == {"1e-3": 0.0, "1e-2": 0.0}
    mismatch = verification_success(refs[:, :8], refs, thresholds)
    assert all(math.isnan(v) for v in mismatch.values())


@pytest.mark.parametrize(("far", "key"), [(1e-3, "1e-3"), (0.01, "1e-2"), (2.5e-4, "2.5e-4")])
def test_far_keys(far: float, key: str) -> None:
    assert far_key(far) == key


def test_recipes() -> None:
    strong, weak = AttackRecipe(), AttackRecipe.l1_only()
    assert strong.identity_weight > 0 and strong.flip and strong.val_fraction > 0
    assert strong.needs_dlib_torch and not weak.needs_dlib_torch
    assert weak.description == "L1 loss"
    assert "identity loss" in strong.description and "early stopping" in strong.description
