"""The default `dlib` extractor: reproduces the shipped LFW cache, and handles no face, many
faces and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advplugin.adapters import Extractor, create_extractor, list_extractors
from advplugin.images import ImageError, load_image


@pytest.fixture(scope="module")
def dlib_extractor() -> Extractor:
    return create_extractor("dlib")


def test_registry_lists_adapters_and_rejects_unknown() -> None:
    assert {"dlib", "onnx", "callable"} <= set(list_extractors())
    with pytest.raises(ValueError, match="unknown extractor 'dlb'; available: "):
        create_extractor("dlb")


def test_reproduces_shipped_cache(dlib_extractor: Extractor, face_data: Path, lfw_cache) -> None:
    """The cache README says how it was made; our extractor must give the same vectors."""
    picks = np.flatnonzero(lfw_cache["detected"] == 1)[::997][:10]
    for i in picks:
        vec, detected = dlib_extractor.extract_central(
            load_image(face_data / "lfw-dev" / lfw_cache["path"][i])
        )
        assert detected
        assert np.abs(vec - lfw_cache["embedding"][i]).max() < 1e-4


def test_many_faces_and_selection(dlib_extractor: Extractor, packaged_images: Path) -> None:
    image = load_image(packaged_images / "t1.jpg")  # a group photo
    faces = dlib_extractor.extract(image)
    n = len(faces.detections)
    assert n >= 3
    assert faces.embeddings.shape == (n, 128) and faces.embeddings.dtype == np.float32
    assert faces.detections.landmarks.shape == (n, 5, 2)
    # Different people in one photo get clearly different embeddings.
    d = np.linalg.norm(faces.embeddings[:, None] - faces.embeddings[None], axis=-1)
    assert d[~np.eye(n, dtype=bool)].min() > 0.3
    boxes = faces.detections.boxes
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Largest first (CompreFace's order): dlib's own order, by score, put the largest fourth.
    assert (np.diff(areas) <= 0).all(), areas
    largest = dlib_extractor.extract(image, largest_only=True)
    assert len(largest.detections) == 1
    np.testing.assert_allclose(largest.detections.boxes[0], boxes[np.argmax(areas)])
    assert len(dlib_extractor.extract(image, max_faces=2).detections) == 2
    assert "hidden" in repr(faces)  # the repr never prints vectors


def test_no_face(dlib_extractor: Extractor) -> None:
    blank = np.full((200, 200, 3), 127, np.uint8)
    faces = dlib_extractor.extract(blank)
    assert len(faces.detections) == 0 and faces.embeddings.shape == (0, 128)
    vec, detected = dlib_extractor.extract_central(blank)
    assert not detected and vec.shape == (128,)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((50, 50, 3), np.float32),
        np.zeros((50, 50, 4), np.uint8),
        np.zeros((4, 4, 3), np.uint8),
        "img.jpg",
    ],
    ids=["float", "rgba", "tiny", "path-string"],
)
def test_bad_arrays_are_clear_errors(dlib_extractor: Extractor, image) -> None:
    with pytest.raises(ImageError):
        dlib_extractor.extract(image)


def test_callable_adapter_wraps_a_function() -> None:
    seen: list[tuple[int, ...]] = []

    def mean_colour(img: np.ndarray) -> np.ndarray:
        seen.append(img.shape)
        return img.reshape(-1, 3).mean(0).astype(np.float32)

    ex = create_extractor("callable", fn=mean_colour, dim=3)
    faces = ex.extract(np.full((20, 30, 3), 9, np.uint8))
    np.testing.assert_array_equal(faces.embeddings, [[9, 9, 9]])
    assert seen == [(20, 30, 3)] and faces.detections.boxes.tolist() == [[0, 0, 30, 20]]
    with pytest.raises(ValueError, match="dimension 3, expected 4"):
        create_extractor("callable", fn=mean_colour, dim=4).extract(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="callable"):
        create_extractor("callable", fn="not a function", dim=3)
