"""Verification on an LFW-format pairs file, shared by `verify-pairs`, tests and evaluation.

Scores go through a `score_fn(probes, gallery) -> [P, G]` so raw embeddings (cosine) and
every protector (its own `score`) are measured by exactly the same code.
"""

from __future__ import annotations

import numpy as np

from advplugin.evaluation.metrics import read_pairs, tar_at_far, ten_fold_accuracy
from advplugin.protectors.base import ScoreFn, l2_normalize


def verification_report(
    templates: np.ndarray,
    paths: np.ndarray,
    identity: np.ndarray,
    pairs_file: str,
    score_fn: ScoreFn,
) -> dict[str, float]:
    """Accuracy (10-fold), its std and TAR@FAR=1e-3 for templates scored by `score_fn`."""
    protocol = read_pairs(pairs_file)
    index = {str(p): i for i, p in enumerate(paths)}
    missing = sorted({p for p in protocol.left + protocol.right if p not in index})
    if missing:
        raise ValueError(
            f"{len(missing)} images of the pairs file have no embedding (first: {missing[0]})"
        )
    left = templates[[index[p] for p in protocol.left]]
    right = templates[[index[p] for p in protocol.right]]
    scores = pair_scores(score_fn, left, right)
    accuracy, std = ten_fold_accuracy(scores, protocol.same, protocol.fold)
    used = np.array(sorted({index[p] for p in protocol.left + protocol.right}))
    genuine, impostor = _all_pairs_blocked(templates[used], identity[used], score_fn)
    return {
        "accuracy": accuracy,
        "accuracy_std": std,
        "tar_at_far_1e-3": tar_at_far(genuine, impostor, 1e-3),
        "pairs": len(scores),
        "images": len(used),
        "genuine_pairs": len(genuine),
        "impostor_pairs": len(impostor),
    }


def pair_scores(score_fn: ScoreFn, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Score row i of `left` against row i of `right`.

    A protector's `score` is a full [P, G] matrix (a learned matcher may not be a dot
    product); pairs need only its diagonal, so score in blocks to bound the waste.
    """
    return np.concatenate(
        [np.diag(score_fn(left[i : i + 256], right[i : i + 256])) for i in range(0, len(left), 256)]
    )


def _all_pairs_blocked(
    templates: np.ndarray, identity: np.ndarray, score_fn: ScoreFn, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor scores over all unordered pairs, in blocks to bound memory."""
    genuine, impostor = [], []
    for start in range(0, len(templates), block):
        s = score_fn(templates[start : start + block], templates[start:])
        rows = np.arange(start, min(start + block, len(templates)))
        cols = np.arange(start, len(templates))
        upper = cols[None, :] > rows[:, None]
        same = identity[rows][:, None] == identity[cols][None, :]
        genuine.append(s[upper & same].astype(np.float32))
        impostor.append(s[upper & ~same].astype(np.float32))
    return np.concatenate(genuine), np.concatenate(impostor)


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Raw embeddings are compared by cosine, the same score the protectors use."""
    return l2_normalize(a) @ l2_normalize(b).T
