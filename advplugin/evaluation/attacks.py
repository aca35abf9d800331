"""Utility and privacy measurements on one set of test templates.

Each function takes templates already computed (raw embeddings live only in memory) and
returns plain numbers (and small curves for the figures): never vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from advplugin.evaluation.decoder import apply_linear_map, fit_linear_map
from advplugin.evaluation.metrics import (
    PairsProtocol,
    d_sys,
    local_linkability,
    rank1_identification,
    roc_curve,
    tar_at_far,
    ten_fold_accuracy,
    threshold_at_far,
)
from advplugin.evaluation.pairs_report import cosine_scores as cosine

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def score_matrix(score_fn: ScoreFn, a: np.ndarray, b: np.ndarray, block: int = 1024) -> np.ndarray:
    """score_fn over all rows of a vs b, in row blocks (float32) to bound peak memory."""
    return np.concatenate(
        [np.asarray(score_fn(a[i : i + block], b), np.float32) for i in range(0, len(a), block)]
    )


def genuine_impostor(
    scores: np.ndarray,
    identity_a: np.ndarray,
    identity_b: np.ndarray | None = None,
    *,
    max_impostors: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine scores over all pairs of distinct images of one person, impostor scores over
    all pairs of different people (a uniform sample of `max_impostors` where there are more).

    With one identity list the matrix is symmetric and each unordered pair counts once;
    with two (scores across keys) every ordered pair i != j counts.
    """
    symmetric = identity_b is None
    identity_b = identity_a if identity_b is None else identity_b
    n = len(identity_a)
    same = identity_a[:, None] == identity_b[None, :]
    keep = np.triu(np.ones((n, n), bool), k=1) if symmetric else ~np.eye(n, dtype=bool)
    genuine = scores[same & keep]
    rows, cols = np.nonzero(~same & keep)
    if len(rows) > max_impostors:
        pick = rng.choice(len(rows), max_impostors, replace=False)
        rows, cols = rows[pick], cols[pick]
    return genuine.astype(np.float64), scores[rows, cols].astype(np.float64)


def gallery_split(identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-1 protocol: the first image of each person is the gallery; the other images of
    people with two or more are probes; people with one image act as distractors."""
    _, first = np.unique(identity, return_index=True)
    gallery = np.sort(first)
    probes = np.setdiff1d(np.arange(len(identity)), gallery)
    return gallery, probes


def utility(
    score_fn: ScoreFn,
    templates: np.ndarray,
    identity: np.ndarray,
    paths: np.ndarray,
    protocol: PairsProtocol,
    *,
    max_impostors: int,
    rng: np.random.Generator,
) -> dict[str, object]:
    s = score_matrix(score_fn, templates, templates)
    index = {str(p): i for i, p in enumerate(paths)}
    left = np.array([index[p] for p in protocol.left])
    right = np.array([index[p] for p in protocol.right])
    accuracy, std = ten_fold_accuracy(s[left, right], protocol.same, protocol.fold)
    genuine, impostor = genuine_impostor(s, identity, max_impostors=max_impostors, rng=rng)
    gallery, probes = gallery_split(identity)
    fars, tars = roc_curve(genuine, impostor)
    return {
        "verification_accuracy": accuracy,
        "verification_accuracy_std": std,
        "pairs": len(left),
        "tar_at_far_1e-3": tar_at_far(genuine, impostor, 1e-3),
        "tar_at_far_1e-4": tar_at_far(genuine, impostor, 1e-4),
        "genuine_pairs": len(genuine),
        "impostor_pairs": len(impostor),
        "rank1": rank1_identification(
            s[np.ix_(probes, gallery)], identity[probes], identity[gallery]
        ),
        "rank1_probes": len(probes),
        "rank1_gallery": len(gallery),
        "roc": {"far": fars.tolist(), "tar": tars.tolist()},
    }


def leak_probes(identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leaked templates: one (the first) image of every person with two or more images; the
    attacker's search set: raw embeddings of all other test images (other people included)."""
    _names, first, counts = np.unique(identity, return_index=True, return_counts=True)
    probes = np.sort(first[counts >= 2])
    search = np.setdiff1d(np.arange(len(identity)), probes)
    return probes, search


def identification_rate(estimates: np.ndarray, raw: np.ndarray, identity: np.ndarray) -> float:
    """Rank-1 of leaked-template estimates (rows aligned with `leak_probes`) among raw photos."""
    probes, search = leak_probes(identity)
    if estimates.shape[1] != raw.shape[1]:
        return float("nan")
    return rank1_identification(cosine(estimates, raw[search]), identity[probes], identity[search])


def key_recovery(
    train_templates: np.ndarray,
    train_raw: np.ndarray,
    test_templates: np.ndarray,
    test_raw: np.ndarray,
    identity: np.ndarray,
    sizes: list[int],
    rng: np.random.Generator,
) -> list[dict[str, float]]:
    """Identification after a least-squares estimate of the inverse transform from n known
    (raw, template) pairs, for each n."""
    probes, _ = leak_probes(identity)
    out = []
    for n in sizes:
        pick = rng.choice(len(train_raw), n, replace=False)
        w = fit_linear_map(train_templates[pick], train_raw[pick])
        rate = identification_rate(apply_linear_map(w, test_templates[probes]), test_raw, identity)
        out.append({"pairs": n, "rank1": rate})
    return out


def unlinkability(
    score_fn: ScoreFn,
    templates_key1: np.ndarray,
    templates_key2: np.ndarray,
    identity: np.ndarray,
    *,
    max_impostors: int,
    rng: np.random.Generator,
) -> dict[str, object]:
    """D_sys across two keys: mated = two different photos of one person, one under each key;
    non-mated = photos of two different people under the two keys."""
    s = score_matrix(score_fn, templates_key1, templates_key2)
    mated, non_mated = genuine_impostor(s, identity, identity, max_impostors=max_impostors, rng=rng)
    centres, local, _ = local_linkability(mated, non_mated)
    edges = np.linspace(min(mated.min(), non_mated.min()), max(mated.max(), non_mated.max()), 61)
    m_hist, _ = np.histogram(mated, edges, density=True)
    n_hist, _ = np.histogram(non_mated, edges, density=True)
    # The histogram estimator's floor at these sample counts: D_sys of two samples of the
    # same (non-mated) distribution, so a small D_sys can be told from estimation noise.
    half = min(len(mated), len(non_mated) // 2)
    shuffled = rng.permutation(non_mated)
    return {
        "d_sys": d_sys(mated, non_mated),
        "d_sys_floor": d_sys(shuffled[:half], shuffled[half:]),
        "mated_mean": float(mated.mean()),
        "non_mated_mean": float(non_mated.mean()),
        "mated_pairs": len(mated),
        "non_mated_pairs": len(non_mated),
        "curve": {
            "edges": edges.tolist(),
            "mated": m_hist.tolist(),
            "non_mated": n_hist.tolist(),
            "score": centres.tolist(),
            "local": local.tolist(),
        },
    }


def reconstruction_pairs(
    identity: np.ndarray, limit: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Attacked images (of people with two or more photos) and, for each, another real photo of
    the same person to compare the reconstruction with."""
    attacked, other = [], []
    for name in np.unique(identity):
        idx = np.flatnonzero(identity == name)
        if len(idx) >= 2:
            attacked.extend(idx.tolist())
            other.extend(np.roll(idx, -1).tolist())
    a, o = np.array(attacked, np.int64), np.array(other, np.int64)
    if len(a) > limit:
        pick = np.sort(rng.choice(len(a), limit, replace=False))
        a, o = a[pick], o[pick]
    return a, o


def scorer_threshold(
    scorer_embeddings: np.ndarray,
    identity: np.ndarray,
    far: float,
    rng: np.random.Generator,
    max_impostors: int,
) -> tuple[float, float]:
    """The independent scorer's threshold at `far` on real test photos (impostor pairs), and
    its TAR there on real genuine pairs (the ceiling any reconstruction could reach)."""
    s = cosine(scorer_embeddings, scorer_embeddings)
    genuine, impostor = genuine_impostor(s, identity, max_impostors=max_impostors, rng=rng)
    return threshold_at_far(impostor, far), float(
        (genuine > threshold_at_far(impostor, far)).mean()
    )
