"""What every trainer shares with the evaluation harness: its identity split (so that the
evaluation's test people stay unseen) and the 10-fold accuracy over held-out pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advplugin.evaluation.data import identity_in_test, restrict_pairs
from advplugin.evaluation.metrics import read_pairs, ten_fold_accuracy
from advplugin.protectors.base import l2_normalize


def split_masks(identity: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) by the evaluation harness's identity hash."""
    test = np.array([identity_in_test(str(i), test_fraction) for i in identity])
    return ~test, test


def pair_accuracy(templates: np.ndarray, paths: np.ndarray, pairs_file: Path) -> tuple[float, int]:
    """10-fold cosine accuracy over the pairs of `pairs_file` whose two images are in `paths`
    (the held-out people's), and how many pairs that is."""
    protocol = restrict_pairs(read_pairs(str(pairs_file)), set(map(str, paths)))
    index = {str(p): i for i, p in enumerate(paths)}
    left = l2_normalize(templates[[index[p] for p in protocol.left]], np.float64)
    right = l2_normalize(templates[[index[p] for p in protocol.right]], np.float64)
    accuracy, _ = ten_fold_accuracy(np.sum(left * right, axis=1), protocol.same, protocol.fold)
    return float(accuracy), len(protocol.left)
