"""The dlib detector's cost is bounded per image: it scans at most `max_detector_pixels`
(upsampling included), whatever the image size, while photos within the budget are
detected and embedded exactly as before. CPU time itself: benchmarks/image_cost_bench.py."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from advplugin.adapters.dlib_adapter import (
    DEFAULT_MAX_DETECTOR_PIXELS,
    DlibExtractor,
    detection_plan,
)
from advplugin.images import load_image


class _SpyDetector:
    """Wraps dlib's HOG detector and records the pixels each call scans."""

    def __init__(self, detector: object) -> None:
        self.detector, self.scanned = detector, []

    def run(self, image: np.ndarray, upsample: int, threshold: float):
        self.scanned.append(image.shape[0] * image.shape[1] * 4**upsample)
        return self.detector.run(image, upsample, threshold)


@pytest.fixture(scope="module")
def extractor() -> DlibExtractor:
    return DlibExtractor()


@pytest.fixture(scope="module")
def lfw_face(face_data: Path) -> np.ndarray:
    return load_image(sorted((face_data / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0])


@pytest.mark.parametrize("shape", [(4999, 5000), (5000, 3), (250, 250), (1200, 1700), (1, 1)])
@pytest.mark.parametrize("upsample", [0, 1, 2])
def test_plan_never_exceeds_the_budget(shape: tuple[int, int], upsample: int) -> None:
    h, w = shape
    scale, up = detection_plan(h, w, upsample, DEFAULT_MAX_DETECTOR_PIXELS)
    assert 0 <= up <= upsample and 0 < scale <= 1
    assert round(h * scale) * round(w * scale) * 4**up <= DEFAULT_MAX_DETECTOR_PIXELS * 1.01
    if h * w * 4**upsample <= DEFAULT_MAX_DETECTOR_PIXELS:
        assert (scale, up) == (1.0, upsample)  # within the budget: untouched


def test_crafted_image_scans_at_most_the_budget(extractor: DlibExtractor) -> None:
    """A black 5000x4999 image made the detector scan 100 M pixels (upsample 1): 15 s."""
    spy = _SpyDetector(extractor._detector)
    extractor._detector = spy
    try:
        faces = extractor.extract(np.zeros((4999, 5000, 3), np.uint8))
    finally:
        extractor._detector = spy.detector
    assert len(faces.detections) == 0
    assert spy.scanned and max(spy.scanned) <= DEFAULT_MAX_DETECTOR_PIXELS


def test_photos_within_the_budget_embed_as_before(extractor: DlibExtractor, lfw_face: np.ndarray) -> None:
    unbounded = DlibExtractor(max_detector_pixels=10**12)  # the detector as it was
    got, ref = extractor.extract(lfw_face), unbounded.extract(lfw_face)
    assert len(got.detections) == len(ref.detections) == 1
    np.testing.assert_array_equal(got.detections.boxes, ref.detections.boxes)
    np.testing.assert_allclose(got.embeddings, ref.embeddings, atol=1e-6)


def test_large_photo_face_found_on_the_downscaled_copy_and_embedded_at_full_size(
    extractor: DlibExtractor, lfw_face: np.ndarray
) -> None:
    """Past the budget the detector sees a smaller copy; the box is mapped back, and the
    landmarks and embedding come from the full-resolution image."""
    big = cv2.resize(lfw_face, (2500, 2500), interpolation=cv2.INTER_CUBIC)  # 6.25 M pixels
    faces = extractor.extract(big)
    small = extractor.extract(lfw_face)
    assert len(faces.detections) == 1
    a, b = faces.detections.boxes[0], small.detections.boxes[0] * 10  # the same face, 10x
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    assert inter / union > 0.7  # HOG's windows differ between scales; the face is the same
    # The same face (0.6 is dlib's same-person distance); on the full-size image.
    assert np.linalg.norm(faces.embeddings[0] - small.embeddings[0]) < 0.3
    landmarks = faces.detections.landmarks[0]
    assert (landmarks >= faces.detections.boxes[0, :2] - 100).all() and landmarks.max() > 250
