"""ArcFace-style 5-point alignment, shared by every 112x112 recognition model."""

from __future__ import annotations

import cv2
import numpy as np

#: The standard ArcFace template for a 112x112 crop: left eye centre, right eye centre,
#: nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama's closed form; returns the 2x3 matrix that cv2.warpAffine expects.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face with the given 5 ArcFace-order landmarks to a `size` x `size` crop."""
    if landmarks5.shape != (5, 2):
        raise ValueError(f"alignment needs 5 landmarks, got shape {list(landmarks5.shape)}")
    matrix = similarity_transform(landmarks5, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def arcface_points_from_dlib68(points: np.ndarray) -> np.ndarray:
    """dlib's 68 landmarks -> ArcFace's 5: eye centres (36-41, 42-47), nose tip (30), mouth
    corners (48, 54). The subject's right eye (36-41) is on the image's left."""
    p = np.asarray(points, np.float32)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
