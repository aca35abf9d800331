"""Utility and privacy measurements on one set of test templates.

Each function takes templates already computed (raw embeddings live only in memory) and
returns plain numbers (and small curves for the figures): never vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from advplugin.evaluation.decoder import (
    apply_linear_map,
    apply_mlp_map,
    fit_linear_map,
    train_mlp_map,
)
from advplugin.evaluation.metrics import (
    PairsProtocol,
    d_sys,
    local_linkability,
    maximal_linkability,
    rank1_identification,
    roc_curve,
    subject_weights,
    tar_at_far,
    ten_fold_accuracy,
    threshold_at_far,
)
from advplugin.evaluation.pairs_report import cosine_scores as cosine
from advplugin.protectors.base import ScoreFn, l2_normalize


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


def verification_success(
    estimates: np.ndarray, references: np.ndarray, thresholds: dict[str, float]
) -> dict[str, float]:
    """Success attack rate of raw-embedding estimates (rows aligned with `references`, a real
    photo of the same person each): the share whose cosine passes each threshold (keyed by
    operating point). NaN where the estimates are not in the references' space."""
    if estimates.shape[1] != references.shape[1]:
        return {k: float("nan") for k in thresholds}
    s = np.sum(l2_normalize(estimates, np.float64) * l2_normalize(references, np.float64), axis=1)
    return {k: float((s > t).mean()) for k, t in thresholds.items()}


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
    non-mated = photos of two different people under the two keys.

    `d_sys` counts every mated pair once (the committed reports' figure); `d_sys_per_subject`
    gives every person the same weight (`subject_weights`), so a few people with hundreds
    of photos do not decide it. Each comes with its estimator floor at the same sample sizes.
    """
    s = score_matrix(score_fn, templates_key1, templates_key2)
    mated, non_mated = genuine_impostor(s, identity, identity, max_impostors=max_impostors, rng=rng)
    same = (identity[:, None] == identity[None, :]) & ~np.eye(len(identity), dtype=bool)
    mated_subject = identity[np.nonzero(same)[0]]  # row-major, the order of `mated`
    weights = subject_weights(mated_subject)
    centres, local, _ = local_linkability(mated, non_mated)
    edges = np.linspace(min(mated.min(), non_mated.min()), max(mated.max(), non_mated.max()), 61)
    m_hist, _ = np.histogram(mated, edges, density=True)
    n_hist, _ = np.histogram(non_mated, edges, density=True)
    return {
        "d_sys": d_sys(mated, non_mated),
        "d_sys_floor": linkability_floor(non_mated, len(mated), rng),
        "d_sys_per_subject": d_sys(mated, non_mated, mated_weights=weights),
        "d_sys_per_subject_floor": linkability_floor(non_mated, len(mated), rng, weights=weights),
        "maximal_linkability": maximal_linkability(mated, non_mated),
        "maximal_linkability_per_subject": maximal_linkability(
            mated, non_mated, mated_weights=weights
        ),
        "maximal_linkability_per_subject_floor": linkability_floor(
            non_mated, len(mated), rng, weights=weights, metric=maximal_linkability
        ),
        "mated_mean": float(mated.mean()),
        "non_mated_mean": float(non_mated.mean()),
        "mated_pairs": len(mated),
        "mated_subjects": len(np.unique(mated_subject)),
        "non_mated_pairs": len(non_mated),
        "curve": {
            "edges": edges.tolist(),
            "mated": m_hist.tolist(),
            "non_mated": n_hist.tolist(),
            "score": centres.tolist(),
            "local": local.tolist(),
        },
    }


def linkability_floor(
    non_mated: np.ndarray,
    n_mated: int,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    metric: Callable[..., float] = d_sys,
) -> float:
    """The histogram estimator's floor at these sample counts: `metric` (D_sys by default)
    of two samples of the same (non-mated) distribution, so a small value can be told from
    estimation noise. With `weights` the pseudo-mated sample carries the mated pairs'
    weights (the same effective size)."""
    half = min(n_mated, len(non_mated) // 2)
    shuffled = rng.permutation(non_mated)
    w = None if weights is None else rng.permutation(weights)[:half]
    return metric(shuffled[:half], shuffled[half:], mated_weights=w)


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


# -- Build 3's cheaper attacks: known pairs as a curve, no known pairs, maximal leakage ----------


def enrolment_order(identity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The order in which an attacker enrols chosen photos: one photo of every person first
    (in random order), then second photos, and so on. Distinct people span more of the
    embedding space than repeats of one, so a map fitted on n enrolments is as good as n
    allows."""
    order = rng.permutation(len(identity))
    _, inverse = np.unique(identity[order], return_inverse=True)
    seen: dict[int, int] = {}
    rank = np.empty(len(order), np.int64)
    for i, person in enumerate(inverse):
        rank[i] = seen.get(int(person), 0)
        seen[int(person)] = rank[i] + 1
    return order[np.argsort(rank, kind="stable")]


def known_pair_curve(
    train_templates: np.ndarray,
    train_raw: np.ndarray,
    train_identity: np.ndarray,
    test_templates: np.ndarray,
    test_raw: np.ndarray,
    test_identity: np.ndarray,
    sizes: list[int],
    rng: np.random.Generator,
    *,
    mlp_steps: int = 400,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The black-box attacker's curve: after enrolling n chosen photos of train people and
    reading their templates back, a least-squares and an MLP map templates -> raw; each is
    scored by rank-1 of the test people's leaked templates among their other raw photos.

    The MLP gets the same number of optimiser steps at every n (`mlp_steps`), so a small n
    is not also an undertrained one."""
    probes, _ = leak_probes(test_identity)
    order = enrolment_order(train_identity, rng)
    out = []
    for n in sizes:
        pick = order[:n]
        w = fit_linear_map(train_templates[pick], train_raw[pick])
        batch = min(128, n)
        epochs = max(1, -(-mlp_steps * batch // n))
        mlp = train_mlp_map(
            train_templates[pick], train_raw[pick], epochs=epochs, batch_size=batch,
            seed=seed, progress=False,
        )
        leaked = test_templates[probes]
        out.append({
            "pairs": n,
            "linear_rank1": identification_rate(apply_linear_map(w, leaked), test_raw, test_identity),
            "mlp_rank1": identification_rate(apply_mlp_map(mlp, leaked), test_raw, test_identity),
        })
    return out


def _procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal W minimising ||source W^T - target||_F (rows paired)."""
    u, _, vt = np.linalg.svd(target.T @ source)
    return u @ vt


def pca_alignment(leaked: np.ndarray, public: np.ndarray) -> np.ndarray:
    """An orthogonal map leaked space -> public space from second moments alone: principal
    axes matched by rank, each axis's sign fixed by the sign of the third moment of the
    projections (a skewed cloud tells its two ends apart; an orthogonal key keeps skew).

    Uncentred moments: the dominant axis is then the shared mean direction, which every
    face embedding set has and an orthogonal key only rotates."""
    g, p = l2_normalize(leaked, np.float64), l2_normalize(public, np.float64)

    def axes(x: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(x.T @ x / len(x))
        vectors = vectors[:, np.argsort(values)[::-1]]
        skew = np.sum((x @ vectors) ** 3, axis=0)
        return vectors * np.where(skew < 0, -1.0, 1.0)

    return axes(p) @ axes(g).T


def icp_alignment(
    leaked: np.ndarray,
    public: np.ndarray,
    *,
    init: np.ndarray | None = None,
    iterations: int = 50,
    keep: float = 0.5,
) -> tuple[np.ndarray, int]:
    """Iterative closest point with orthogonal Procrustes: map the leaked templates, pair
    each with its nearest public embedding (cosine), refit the orthogonal map on the `keep`
    fraction of closest pairs (trimmed: most leaked people are not in the public set), and
    repeat until the pairing stops changing. Returns the map and the iterations run."""
    g, p = l2_normalize(leaked, np.float64), l2_normalize(public, np.float64)
    w = pca_alignment(g, p) if init is None else init
    n_keep = max(g.shape[1], int(keep * len(g)))
    previous = None
    for it in range(1, iterations + 1):
        sims = g @ w.T @ p.T
        nearest = np.argmax(sims, axis=1)
        best = sims[np.arange(len(g)), nearest]
        kept = np.argsort(best)[::-1][:n_keep]
        w = _procrustes(g[kept], p[nearest[kept]])
        if previous is not None and np.array_equal(previous, nearest):
            return w, it
        previous = nearest
    return w, iterations


def unsupervised_alignment(
    test_templates: np.ndarray,
    test_raw: np.ndarray,
    test_identity: np.ndarray,
    public_other_people: np.ndarray,
    *,
    iterations: int = 50,
) -> dict[str, object]:
    """The attacker with no known pairs: a leaked gallery (the first photo of every test
    person, as templates) is aligned with unlabelled public raw embeddings by an orthogonal
    map (PCA initialisation, then ICP Procrustes), once with photos of other people
    (`public_other_people`: train people) and once with other photos of the enrolled people
    (the test photos that are not in the gallery). Scored as rank-1 of the leaked templates
    of people with two or more photos, mapped back, among their other raw photos."""
    _, gallery = np.unique(test_identity, return_index=True)
    gallery = np.sort(gallery)
    others = np.setdiff1d(np.arange(len(test_identity)), gallery)
    probes, _ = leak_probes(test_identity)
    leaked = test_templates[gallery]
    out: dict[str, object] = {"gallery": len(gallery)}
    if leaked.shape[1] != test_raw.shape[1]:
        return out | {"other_people": None, "same_people": None}
    for label, public in (("other_people", public_other_people), ("same_people", test_raw[others])):
        w0 = pca_alignment(leaked, public)
        w, its = icp_alignment(leaked, public, init=w0, iterations=iterations)
        out[label] = {
            "public": len(public),
            "pca_rank1": identification_rate(
                (l2_normalize(test_templates[probes], np.float64) @ w0.T).astype(np.float32),
                test_raw,
                test_identity,
            ),
            "icp_rank1": identification_rate(
                (l2_normalize(test_templates[probes], np.float64) @ w.T).astype(np.float32),
                test_raw,
                test_identity,
            ),
            "icp_iterations": its,
        }
    return out
