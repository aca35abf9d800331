"""The extractor contract of `adapters/base.py`: what every extractor's `extract` answers,
whatever order its detector finds faces in."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.adapters import Detections, Extractor

#: Boxes as a detector scoring by confidence might return them: the largest is third.
BOXES = np.array([[0, 0, 20, 20], [30, 0, 40, 10], [50, 0, 90, 40], [0, 50, 20, 70]], np.float32)


class _Boxes(Extractor):
    """Finds `BOXES` in that order; a face's embedding is its box, so the test can see which
    embedding went with which box."""

    name, version, dim = "boxes", "1", 4

    def detect(self, image: np.ndarray) -> Detections:
        return Detections(BOXES.copy(), np.zeros((len(BOXES), 5, 2), np.float32),
                          np.arange(len(BOXES), 0, -1).astype(np.float32))

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        return detections.boxes.copy()


@pytest.mark.parametrize("max_faces", [None, 10, 4, 2])
def test_faces_come_back_largest_first_with_their_own_embeddings(max_faces: int | None) -> None:
    """CompreFace documents faces largest first; dlib returned them by score (a group photo's
    largest face came fourth) unless more than `max_faces` were found."""
    faces = Extractor.extract(_Boxes(), np.zeros((100, 100, 3), np.uint8), max_faces=max_faces)
    areas = faces.detections.areas().tolist()
    # 20x20 (first found) and 20x20 (last found) tie: the detector's order is kept.
    expected = [1600.0, 400.0, 400.0, 100.0][:max_faces]
    assert areas == expected
    np.testing.assert_array_equal(faces.embeddings, faces.detections.boxes)
    assert faces.detections.boxes[1].tolist() == [0, 0, 20, 20]
    assert faces.detections.scores.tolist() == [2.0, 4.0, 1.0, 3.0][:max_faces]


def test_largest_only_is_the_largest() -> None:
    faces = _Boxes().extract(np.zeros((100, 100, 3), np.uint8), largest_only=True)
    assert faces.detections.boxes.tolist() == [[50, 0, 90, 40]]
