"""The extractor contract: image -> face boxes, landmarks and raw embeddings.

Extractors are split into `detect` and `embed` so that callers can choose which faces to
embed (all, the largest, the one nearest the centre) without embedding the others: raw
embeddings that nobody needs should not even be computed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from advplugin.images import check_image_array
from advplugin.registry import Registry


@dataclass(frozen=True)
class Detections:
    """Faces found in one image: boxes [N, 4] as x1, y1, x2, y2; landmarks [N, K, 2]
    (K and point order are the detector's own, see each adapter); scores [N]."""

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, index: np.ndarray | list[int]) -> Detections:
        idx = np.asarray(index, dtype=np.int64)
        return Detections(self.boxes[idx], self.landmarks[idx], self.scores[idx])

    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])

    def largest(self) -> Detections:
        if len(self) == 0:
            return self
        return self.select([int(np.argmax(self.areas()))])

    def nearest_centre(self, height: int, width: int) -> Detections:
        if len(self) == 0:
            return self
        cx = (self.boxes[:, 0] + self.boxes[:, 2]) / 2 - width / 2
        cy = (self.boxes[:, 1] + self.boxes[:, 3]) / 2 - height / 2
        return self.select([int(np.argmin(cx**2 + cy**2))])

    @staticmethod
    def empty(n_landmarks: int = 5) -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32),
            np.zeros((0, n_landmarks, 2), np.float32),
            np.zeros(0, np.float32),
        )


@dataclass(frozen=True)
class Faces:
    """Detections plus their raw embeddings [N, D] float32.

    Short-lived by design: pass `embeddings` to a protector and drop the object. Its repr
    hides the vectors so that a stray log line or traceback cannot print them.
    """

    detections: Detections
    embeddings: np.ndarray

    def __repr__(self) -> str:
        return (
            f"Faces(n={len(self.detections)}, dim={self.embeddings.shape[1]}, embeddings=<hidden>)"
        )


class Extractor(ABC):
    """Subclasses set `name`, `version` and `dim` and implement `detect` and `embed`."""

    name: str
    version: str
    dim: int

    @abstractmethod
    def detect(self, image: np.ndarray) -> Detections: ...

    @abstractmethod
    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        """Raw embeddings [len(detections), dim] float32 for the given faces."""

    def extract(
        self, image: np.ndarray, *, max_faces: int | None = None, largest_only: bool = False
    ) -> Faces:
        """Detect and embed faces in an RGB uint8 image; at most `max_faces`, largest first.

        The one place faces are ordered for every caller (both APIs' identify, recognize,
        detect, verify and enrol answers): by box area, largest first, as CompreFace
        documents, ties in the detector's order. Detectors return their own order (dlib's:
        by score), which put a group photo's largest face fourth."""
        image = check_image_array(image)
        det = self.detect(image)
        if largest_only:
            det = det.largest()
        elif len(det) > 1:
            det = det.select(np.argsort(-det.areas(), kind="stable")[:max_faces])
        emb = self.embed(image, det) if len(det) else np.zeros((0, self.dim), np.float32)
        return Faces(det, emb)

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """Detection scores as confidences in [0, 1], for callers that report one (the
        service's `probability`). Default: the scores clipped, for detectors whose scores
        already are probabilities; a detector with unbounded scores overrides it."""
        return np.clip(np.asarray(scores, np.float64), 0.0, 1.0)

    def fallback_box(self, height: int, width: int) -> Detections:
        """A centred box spanning 40 % of the width and height, used when no face is
        detected in a pre-cropped photo (the LFW cache's convention, reproduced exactly)."""
        box = np.array([[0.3 * width, 0.3 * height, 0.7 * width, 0.7 * height]], np.float32)
        return Detections(box, np.zeros((1, 0, 2), np.float32), np.zeros(1, np.float32))

    def extract_central(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """One embedding per image: the face nearest the centre, or the fallback box.

        This is how face datasets of pre-cropped photos (LFW) are embedded: exactly one
        vector per image, and a flag saying whether a detector actually found the face.
        """
        image = check_image_array(image)
        h, w = image.shape[:2]
        det = self.detect(image).nearest_centre(h, w)
        detected = len(det) > 0
        if not detected:
            det = self.fallback_box(h, w)
        return self.embed(image, det)[0], detected

    @property
    def description(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "dim": self.dim}

    def __reduce__(self) -> object:
        # Native models (dlib, onnxruntime sessions) do not pickle; say so plainly.
        raise TypeError(f"extractor {self.name!r} cannot be pickled; create one per process")


EXTRACTORS: Registry[Extractor] = Registry("extractor")
register_extractor = EXTRACTORS.register


def create_extractor(name: str = "dlib", /, **config: object) -> Extractor:
    """Build a registered extractor by name, e.g. `create_extractor("onnx", model_path=...)`."""
    return EXTRACTORS.create(name, **config)


def list_extractors() -> list[str]:
    return EXTRACTORS.names()
