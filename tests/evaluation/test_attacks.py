"""Attack measurements on real dlib embeddings of LFW (the shipped cache; recomputing it is
not the point here), with answers known from the schemes' construction."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.evaluation import attacks
from advplugin.evaluation.data import ImageFolder, generate_pairs
from advplugin.evaluation.decoder import (
    apply_linear_map,
    apply_mlp_map,
    fit_linear_map,
    linear_fit_residual,
    train_mlp_map,
)
from advplugin.keys import Key
from advplugin.protectors import create_protector


@pytest.fixture(scope="module")
def people(lfw_cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Disjoint train/test people with 2-6 photos each, from the shipped embeddings."""
    ids = lfw_cache["identity"].astype(str)
    names, counts = np.unique(ids, return_counts=True)
    multi = names[(counts >= 2) & (counts <= 6)]
    train_names, test_names = set(multi[0::2][:300]), set(multi[1::2][:250])
    train = np.flatnonzero(np.isin(ids, list(train_names)))
    test = np.flatnonzero(np.isin(ids, list(test_names)))
    emb = lfw_cache["embedding"].astype(np.float32)
    return {
        "train_raw": emb[train],
        "test_raw": emb[test],
        "test_id": ids[test],
        "test_path": lfw_cache["path"].astype(str)[test],
    }


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_xnn_utility_equals_raw(people: dict[str, np.ndarray]) -> None:
    raw, ids, paths = people["test_raw"], people["test_id"], people["test_path"]
    protocol = generate_pairs(ImageFolder(None, paths, ids), per_fold=50)  # type: ignore[arg-type]
    none = create_protector("none", dim=128)
    xnn = create_protector("xnn", key=Key.generate(), dim=128)
    kw = {"max_impostors": 100_000}
    base = attacks.utility(none.score, none.protect(raw), ids, paths, protocol, rng=_rng(), **kw)
    prot = attacks.utility(xnn.score, xnn.protect(raw), ids, paths, protocol, rng=_rng(), **kw)
    for name in ("verification_accuracy", "tar_at_far_1e-3", "rank1"):
        assert prot[name] == pytest.approx(base[name], abs=1e-3)
    assert base["verification_accuracy"] > 0.95 and base["rank1"] > 0.9


def test_leaked_xnn_templates_identify_nobody_directly_but_a_learned_map_does(
    people: dict[str, np.ndarray],
) -> None:
    raw, ids = people["test_raw"], people["test_id"]
    xnn = create_protector("xnn", key=Key.generate(), dim=128)
    probes, _ = attacks.leak_probes(ids)
    chance = 1 / len(np.unique(ids))
    raw_rate = attacks.identification_rate(raw[probes], raw, ids)
    assert raw_rate > 0.9
    assert attacks.identification_rate(xnn.protect(raw)[probes], raw, ids) < chance + 0.03
    t_train = xnn.protect(people["train_raw"])
    w = fit_linear_map(t_train, people["train_raw"])
    mapped = apply_linear_map(w, xnn.protect(raw)[probes])
    assert attacks.identification_rate(mapped, raw, ids) == pytest.approx(raw_rate, abs=0.02)
    mlp = train_mlp_map(t_train, people["train_raw"], epochs=20, hidden=256, progress=False)
    assert attacks.identification_rate(apply_mlp_map(mlp, xnn.protect(raw)[probes]), raw, ids) > 0.5


def test_key_recovery_needs_about_dim_pairs(people: dict[str, np.ndarray]) -> None:
    xnn = create_protector("xnn", key=Key.generate(), dim=128)
    raw, ids = people["test_raw"], people["test_id"]
    probes, _ = attacks.leak_probes(ids)
    raw_rate = attacks.identification_rate(raw[probes], raw, ids)
    sweep = attacks.key_recovery(
        xnn.protect(people["train_raw"]),
        people["train_raw"],
        xnn.protect(raw),
        raw,
        ids,
        [16, 256],
        _rng(),
    )
    assert sweep[0]["rank1"] < 0.5 * raw_rate
    assert sweep[1]["rank1"] == pytest.approx(raw_rate, abs=0.02)


def test_linearity_is_detected_by_fitting(people: dict[str, np.ndarray]) -> None:
    raw = people["train_raw"]
    for matrix in ("orthogonal", "gaussian"):
        xnn = create_protector("xnn", key=Key.generate(), dim=128, matrix=matrix)
        assert linear_fit_residual(xnn.protect(raw), raw) < 1e-3
    assert linear_fit_residual(np.sign(raw - np.median(raw, 0)), raw) > 0.1


def test_unlinkability_across_keys(people: dict[str, np.ndarray]) -> None:
    raw, ids = people["test_raw"], people["test_id"]
    none = create_protector("none", dim=128)
    linkable = attacks.unlinkability(none.score, raw, raw, ids, max_impostors=200_000, rng=_rng())
    assert linkable["d_sys"] > 0.8
    a = create_protector("xnn", key=Key.generate(), dim=128)
    b = create_protector("xnn", key=Key.generate(), dim=128)
    unlinkable = attacks.unlinkability(
        a.score, a.protect(raw), b.protect(raw), ids, max_impostors=200_000, rng=_rng()
    )
    assert unlinkable["d_sys"] < 0.25  # small: see the mean shift below
    assert unlinkable["d_sys_floor"] < 0.08 and linkable["d_sys_floor"] < 0.08
    # Across keys the scores of one person's photos are barely shifted from two people's
    # (x^T R y keeps a trace of x ~ y for a fixed pair of keys); raw scores are far apart.
    mated_shift = unlinkable["mated_mean"] - unlinkable["non_mated_mean"]
    raw_shift = linkable["mated_mean"] - linkable["non_mated_mean"]
    assert abs(mated_shift) < 0.2 * raw_shift
    # The same key twice is as linkable as raw: the measure sees the link, not the key ids.
    same_key = attacks.unlinkability(
        a.score, a.protect(raw), a.protect(raw), ids, max_impostors=200_000, rng=_rng()
    )
    assert same_key["d_sys"] == pytest.approx(linkable["d_sys"], abs=0.05)
