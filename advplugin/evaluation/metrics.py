"""Verification and identification metrics, computed the way LFW and the papers do.

Scores are similarities (higher = same person). Everything here is plain numpy so that the
same code scores raw embeddings, protected templates and attack outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairsProtocol:
    """LFW `pairs.txt`: folds of (image a, image b, same person?)."""

    left: list[str]
    right: list[str]
    same: np.ndarray  # bool [P]
    fold: np.ndarray  # int [P]
    n_folds: int


def image_name(identity: str, number: int) -> str:
    """LFW's convention: `Name i` is the image `Name/Name_{i:04d}.jpg`."""
    return f"{identity}/{identity}_{number:04d}.jpg"


def read_pairs(path: str) -> PairsProtocol:
    """Parse LFW's pairs format: a header `folds n`, then per fold n matched lines
    `Name i j` and n mismatched lines `Name1 i Name2 j`."""
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.strip()]
    if not lines or len(lines[0]) != 2:
        raise ValueError(f"{path}: first line must be '<folds> <pairs per fold>'")
    n_folds, per = int(lines[0][0]), int(lines[0][1])
    body = lines[1:]
    if len(body) != n_folds * 2 * per:
        raise ValueError(f"{path}: expected {n_folds * 2 * per} pair lines, found {len(body)}")
    left, right, same, fold = [], [], [], []
    for k, parts in enumerate(body):
        if len(parts) == 3:
            left.append(image_name(parts[0], int(parts[1])))
            right.append(image_name(parts[0], int(parts[2])))
            same.append(True)
        elif len(parts) == 4:
            left.append(image_name(parts[0], int(parts[1])))
            right.append(image_name(parts[2], int(parts[3])))
            same.append(False)
        else:
            raise ValueError(f"{path}: line {k + 2} is neither 'Name i j' nor 'Name1 i Name2 j'")
        fold.append(k // (2 * per))
    return PairsProtocol(left, right, np.array(same), np.array(fold), n_folds)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising accuracy on (scores, same); ties resolved to the midpoint."""
    order = np.argsort(scores)
    s, y = scores[order], same[order].astype(np.int64)
    # Threshold just above s[k]: pairs 0..k rejected, k+1.. accepted.
    neg_below = np.concatenate([[0], np.cumsum(1 - y)])
    pos_above = np.concatenate([[y.sum()], y.sum() - np.cumsum(y)])
    correct = neg_below + pos_above
    k = int(np.argmax(correct))
    candidates = np.concatenate([[s[0] - 1e-6], (s[:-1] + s[1:]) / 2, [s[-1] + 1e-6]])
    return float(candidates[k])


def ten_fold_accuracy(
    scores: np.ndarray, same: np.ndarray, fold: np.ndarray
) -> tuple[float, float]:
    """LFW's protocol: for each fold, pick the threshold on the other folds, test on it.

    Returns mean and standard deviation of the per-fold accuracies (fractions).
    """
    scores = np.asarray(scores, np.float64)
    accs = []
    for f in np.unique(fold):
        test = fold == f
        thr = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] > thr) == same[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """True-accept rate at the threshold where the impostor accept rate is at most `far`."""
    genuine = np.asarray(genuine, np.float64)
    impostor = np.sort(np.asarray(impostor, np.float64))
    if len(impostor) == 0 or len(genuine) == 0:
        raise ValueError("TAR at FAR needs genuine and impostor scores")
    threshold = threshold_at_far(impostor, far)
    return float((genuine > threshold).mean())


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest threshold t such that the fraction of impostor scores > t is at most `far`."""
    impostor = np.sort(np.asarray(impostor, np.float64))
    allowed = int(np.floor(far * len(impostor)))
    return float(impostor[len(impostor) - allowed - 1])


def all_pair_scores(
    templates: np.ndarray, identity: np.ndarray, score_fn
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor scores over all unordered pairs of distinct images."""
    s = np.asarray(score_fn(templates, templates), np.float64)
    iu = np.triu_indices(len(templates), k=1)
    same = identity[iu[0]] == identity[iu[1]]
    flat = s[iu]
    return flat[same], flat[~same]


def rank1_identification(
    probe_scores: np.ndarray, probe_identity: np.ndarray, gallery_identity: np.ndarray
) -> float:
    """Fraction of probes whose best-scoring gallery entry has the probe's identity."""
    best = np.argmax(probe_scores, axis=1)
    return float((gallery_identity[best] == probe_identity).mean())
