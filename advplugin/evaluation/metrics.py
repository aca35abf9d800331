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
    if allowed >= len(impostor):  # every impostor may pass: accept everything
        return float("-inf")
    return float(impostor[len(impostor) - allowed - 1])


def rank1_identification(
    probe_scores: np.ndarray, probe_identity: np.ndarray, gallery_identity: np.ndarray
) -> float:
    """Fraction of probes whose best-scoring gallery entry has the probe's identity."""
    best = np.argmax(probe_scores, axis=1)
    return float((gallery_identity[best] == probe_identity).mean())


def roc_curve(
    genuine: np.ndarray, impostor: np.ndarray, fars: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """TAR at each FAR of `fars` (log-spaced down to 1 / #impostors by default), for plots."""
    impostor = np.asarray(impostor, np.float64)
    if fars is None:
        lowest = max(1.0 / len(impostor), 1e-6)
        fars = np.logspace(np.log10(lowest), 0, 60)
    tars = np.array([tar_at_far(genuine, impostor, float(f)) for f in fars])
    return np.asarray(fars, np.float64), tars


def local_linkability(
    mated: np.ndarray,
    non_mated: np.ndarray,
    *,
    omega: float = 1.0,
    bins: int | None = None,
    mated_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The local measure D<->(s) of Gomez-Barrero et al. (TIFS 2018) on a histogram grid.

    D<->(s) = p(H_m|s) - p(H_nm|s) where that is positive, else 0; with the likelihood ratio
    LR(s) = p(s|H_m) / p(s|H_nm) and prior ratio omega it is 2 omega LR / (1 + omega LR) - 1.
    Where no non-mated score falls, the score alone proves linkage: D = 1.
    Returns bin centres, D<->, and the mated density p(s|H_m) on the same bins. By default
    there are min(100, #mated / 10) bins (the authors' choice): finer bins on few scores
    would leave empty non-mated bins and overstate linkability. `mated_weights` weighs the
    mated scores (see `subject_weights`); the bin count then follows their effective number.
    """
    mated = np.asarray(mated, np.float64)
    non_mated = np.asarray(non_mated, np.float64)
    if len(mated) == 0 or len(non_mated) == 0:
        raise ValueError("linkability needs mated and non-mated scores")
    if mated_weights is not None:
        mated_weights = np.asarray(mated_weights, np.float64)
        if mated_weights.shape != mated.shape or (mated_weights < 0).any() or mated_weights.sum() <= 0:
            raise ValueError("mated weights must be non-negative, one per mated score")
    if bins is None:
        bins = int(np.clip(effective_count(mated_weights, len(mated)) // 10, 10, 100))
    lo = min(mated.min(), non_mated.min())
    hi = max(mated.max(), non_mated.max())
    if hi - lo < 1e-12:  # every score equal: the score says nothing
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    p_m, _ = np.histogram(mated, edges, weights=mated_weights, density=True)
    p_nm, _ = np.histogram(non_mated, edges, density=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(p_nm > 0, p_m / np.where(p_nm > 0, p_nm, 1.0), np.inf)
        d = np.where(np.isinf(lr), 1.0, 2 * omega * lr / (1 + omega * lr) - 1)
    d = np.where(omega * lr > 1, d, 0.0)
    d = np.where((p_m == 0) & (p_nm == 0), 0.0, d)
    return (edges[:-1] + edges[1:]) / 2, d, p_m


def effective_count(weights: np.ndarray | None, n: int) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2; `n` when unweighted."""
    if weights is None:
        return float(n)
    return float(weights.sum() ** 2 / np.sum(weights**2))


def subject_weights(subject: np.ndarray) -> np.ndarray:
    """Weights giving every subject the same total weight among its mated pairs.

    Why: mated pairs grow with the square of a person's photo count, so on LFW one person
    holds 43 % of the test people's mated pairs. Unweighted, D_sys then mostly measures how
    tightly *that person's* cross-key scores cluster (any deterministic template does
    cluster), not whether mated pairs score differently from non-mated ones in general.
    """
    _, inverse, counts = np.unique(subject, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def d_sys(
    mated: np.ndarray,
    non_mated: np.ndarray,
    *,
    omega: float = 1.0,
    bins: int | None = None,
    mated_weights: np.ndarray | None = None,
) -> float:
    """Global linkability D_sys = integral of p(s|H_m) D<->(s) ds: 0 unlinkable, 1 fully linkable."""
    centres, d, p_m = local_linkability(
        mated, non_mated, omega=omega, bins=bins, mated_weights=mated_weights
    )
    width = centres[1] - centres[0] if len(centres) > 1 else 1.0
    return float(np.clip(np.sum(p_m * d) * width, 0.0, 1.0))


def maximal_linkability(
    mated: np.ndarray,
    non_mated: np.ndarray,
    *,
    bins: int = 30,
    mated_weights: np.ndarray | None = None,
) -> float:
    """Maximal leakage of "mated or not" through the score (Otroshi Shahreza, Shkel, Marcel,
    TIFS 2023): log2 of the integral of max(p(s|H_m), p(s|H_nm)), in bits, 0 (the score says
    nothing) to 1 (it always tells). Unlike D_sys it needs no prior ratio and is an upper
    bound on what *any* guess of mated/non-mated gains from the score (the operational
    meaning the authors prove). Histogram estimate with the authors' 30 bins by default.
    """
    mated = np.asarray(mated, np.float64)
    non_mated = np.asarray(non_mated, np.float64)
    if len(mated) == 0 or len(non_mated) == 0:
        raise ValueError("linkability needs mated and non-mated scores")
    lo = min(mated.min(), non_mated.min())
    hi = max(mated.max(), non_mated.max())
    if hi - lo < 1e-12:
        return 0.0
    edges = np.linspace(lo, hi, bins + 1)
    p_m, _ = np.histogram(mated, edges, weights=mated_weights, density=True)
    p_nm, _ = np.histogram(non_mated, edges, density=True)
    leakage = np.sum(np.maximum(p_m, p_nm)) * (edges[1] - edges[0])
    return float(np.clip(np.log2(leakage), 0.0, 1.0))


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image of a batch [N, H, W, C] (inf where equal)."""
    diff = np.asarray(reference, np.float64) - np.asarray(test, np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak**2 / mse)


def ssim(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Structural similarity (Wang et al. 2004; Gaussian window sigma 1.5, K1 .01, K2 .03) per
    image of a batch [N, H, W, C], averaged over pixels and channels."""
    import cv2

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    out = []
    for a, b in zip(np.asarray(reference, np.float64), np.asarray(test, np.float64), strict=True):

        def blur(x: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a**2
        var_b = blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        out.append(float(s.mean()))
    return np.array(out)
