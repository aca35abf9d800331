"""Build 3's cheaper attacks on real dlib embeddings of LFW (the shipped cache): the
known-pair curve, the attacker with no known pairs, with answers known from the schemes'
construction (an orthogonal key changes nothing for a rotation-invariant attacker)."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.evaluation import attacks
from advplugin.keys import Key
from advplugin.protectors import create_protector


@pytest.fixture(scope="module")
def people(lfw_cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Disjoint train/test people with 2-8 photos each, from the shipped embeddings."""
    ids = lfw_cache["identity"].astype(str)
    names, counts = np.unique(ids, return_counts=True)
    multi = names[(counts >= 2) & (counts <= 8)]
    train = np.flatnonzero(np.isin(ids, multi[0::2][:400]))
    test = np.flatnonzero(np.isin(ids, multi[1::2][:300]))
    emb = lfw_cache["embedding"].astype(np.float32)
    return {"train_raw": emb[train], "train_id": ids[train], "test_raw": emb[test], "test_id": ids[test]}


def test_enrolment_order_takes_one_photo_of_everyone_first() -> None:
    ids = np.array(["a", "a", "a", "b", "c", "c"])
    order = attacks.enrolment_order(ids, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(6))
    assert sorted(ids[order[:3]].tolist()) == ["a", "b", "c"]
    assert ids[order[-1]] == "a"


def test_known_pair_curve_rises_to_raw_for_xnn(people: dict[str, np.ndarray]) -> None:
    """`xnn` is linear: with about `dim` pairs least squares inverts it (rank-1 near raw's),
    with 16 it cannot; the MLP map learns it too given enough pairs."""
    p = create_protector("xnn", key=Key.generate(), dim=128)
    tr, te = people["train_raw"], people["test_raw"]
    probes, _ = attacks.leak_probes(people["test_id"])
    raw_rank1 = attacks.identification_rate(te[probes], te, people["test_id"])
    curve = attacks.known_pair_curve(
        p.protect(tr), tr, people["train_id"], p.protect(te), te, people["test_id"],
        [16, 512], np.random.default_rng(0), mlp_steps=300,
    )  # fmt: skip
    assert [c["pairs"] for c in curve] == [16, 512]
    few, many = curve
    assert many["linear_rank1"] > raw_rank1 - 0.05
    assert few["linear_rank1"] < raw_rank1 / 2
    assert many["mlp_rank1"] > few["mlp_rank1"] and many["mlp_rank1"] > 0.5


def test_no_known_pairs_alignment_is_blind_to_an_orthogonal_key(
    people: dict[str, np.ndarray],
) -> None:
    """PCA + ICP use only rotation-invariant structure, so `xnn` templates give the attacker
    what raw embeddings would: the same rank-1, whatever that is."""
    te, ids, public = people["test_raw"], people["test_id"], people["train_raw"]
    raw = attacks.unsupervised_alignment(te, te, ids, public, iterations=20)
    xnn = create_protector("xnn", key=Key.generate(), dim=128)
    keyed = attacks.unsupervised_alignment(xnn.protect(te), te, ids, public, iterations=20)
    for scenario in ("other_people", "same_people"):
        for measure in ("pca_rank1", "icp_rank1"):
            assert keyed[scenario][measure] == pytest.approx(raw[scenario][measure], abs=0.02)


def test_icp_recovers_the_key_from_a_close_start(people: dict[str, np.ndarray]) -> None:
    """The refinement works where the start is near the truth (a small rotation off the
    inverse key): ICP then identifies most leaked people, far above the start. What the
    attack lacks is the start, not the refinement (docs/evaluation/README.md)."""
    te, ids = people["test_raw"], people["test_id"]
    xnn = create_protector("xnn", key=Key.generate(), dim=128)
    t = xnn.protect(te)
    truth = xnn._transform.T  # type: ignore[attr-defined]  # template -> raw: the key's inverse
    rng = np.random.default_rng(0)
    skew = rng.normal(0, 0.07, (128, 128))  # a start at about 44 % rank-1
    q, r = np.linalg.qr(np.eye(128) + (skew - skew.T))
    q = q * np.sign(np.diag(r))  # the rotation near the identity, not a sign-flipped one
    start = q @ truth
    _, gallery = np.unique(ids, return_index=True)
    others = np.setdiff1d(np.arange(len(ids)), gallery)
    w, _its = attacks.icp_alignment(t[gallery], te[others], init=start, iterations=30)
    probes, _ = attacks.leak_probes(ids)

    def rank1(m: np.ndarray) -> float:
        return attacks.identification_rate((t[probes] @ m.T).astype(np.float32), te, ids)

    assert rank1(w) > rank1(start) + 0.2
    assert rank1(w) > 0.6


def test_alignment_needs_equal_dimensions(people: dict[str, np.ndarray]) -> None:
    te, ids = people["test_raw"], people["test_id"]
    out = attacks.unsupervised_alignment(te[:, :64], te, ids, people["train_raw"])
    assert out["other_people"] is None and out["same_people"] is None
