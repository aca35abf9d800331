"""`dlib`: the default, offline extractor.

HOG face detector, 5-point shape predictor and the ResNet face-recognition model shipped in
the PyPI package `face-recognition-models` (no download at run time). The output is dlib's
128-d descriptor, unnormalised (dlib compares by Euclidean distance, threshold 0.6; the
protectors normalise, which orders pairs the same way for vectors of similar norm).
Landmarks are the 5-point model's points in its own order: right eye outer and inner
corner, left eye outer and inner corner, base of the nose.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np

from advplugin.adapters.base import Detections, Extractor, register_extractor


@cache
def model_dir() -> Path:
    # `face_recognition_models/__init__.py` imports pkg_resources, which recent setuptools no
    # longer ships; locating the package without importing it avoids that dependency.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dlib extractor needs the package `face-recognition-models`")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibExtractor(Extractor):
    name = "dlib"
    dim = 128

    def __init__(self, *, upsample: int = 1, num_jitters: int = 0) -> None:
        import dlib

        if upsample < 0 or num_jitters < 0:
            raise ValueError("upsample and num_jitters must be >= 0")
        self.upsample = upsample
        self.num_jitters = num_jitters
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shapes = dlib.shape_predictor(
            str(model_dir() / "shape_predictor_5_face_landmarks.dat")
        )
        self._net = dlib.face_recognition_model_v1(
            str(model_dir() / "dlib_face_recognition_resnet_model_v1.dat")
        )
        self.version = f"dlib-{dlib.__version__}/resnet_v1/frm-{importlib.metadata.version('face-recognition-models')}"

    def detect(self, image: np.ndarray) -> Detections:
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        if not rects:
            return Detections.empty(5)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32)
        landmarks = np.array(
            [[(p.x, p.y) for p in self._shapes(image, r).parts()] for r in rects], np.float32
        )
        return Detections(boxes, landmarks, np.asarray(scores, np.float32))

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        dlib = self._dlib
        shapes = dlib.full_object_detections()
        for x1, y1, x2, y2 in detections.boxes:
            rect = dlib.rectangle(round(x1), round(y1), round(x2), round(y2))
            shapes.append(self._shapes(image, rect))
        vectors = self._net.compute_face_descriptor(image, shapes, self.num_jitters)
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(-1, self.dim)


@register_extractor("dlib")
def _create_dlib(**config: object) -> DlibExtractor:
    return DlibExtractor(**config)  # type: ignore[arg-type]
