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
import math
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from advplugin.adapters.base import Detections, Extractor, register_extractor

#: Pixels the HOG detector may scan per image, upsampling included (each upsample step
#: quadruples them). HOG costs about 80 ms per million pixels on one core: a blank
#: 5000x4999 PNG with upsample 1 (100 M pixels) once cost 15 s of CPU and 1.5 GB. Photos
#: within the budget (LFW's 250x250 with upsample 1: 0.25 M) are detected exactly as before;
#: a 2 M budget bounds detection near 0.2 s (benchmarks/image_cost_bench.py).
DEFAULT_MAX_DETECTOR_PIXELS = 2_000_000


def detection_plan(height: int, width: int, upsample: int, max_pixels: int) -> tuple[float, int]:
    """(scale, upsample) for the detector so that it scans at most `max_pixels`: first fewer
    upsampling steps, then, at none, a downscaled copy (faces smaller than ~80 pixels at that
    scale are then missed: the price of a bounded cost)."""
    pixels = height * width
    while upsample > 0 and pixels * 4**upsample > max_pixels:
        upsample -= 1
    if pixels * 4**upsample <= max_pixels:
        return 1.0, upsample
    return math.sqrt(max_pixels / pixels), 0


@cache
def model_dir() -> Path:
    # `face_recognition_models/__init__.py` imports pkg_resources, which recent setuptools no
    # longer ships; locating the package without importing it avoids that dependency.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dlib extractor needs the package `face-recognition-models`")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def resnet_model_path() -> Path:
    """dlib's face-recognition ResNet weights (read by dlib, and by `dlib-torch`'s parser)."""
    return model_dir() / "dlib_face_recognition_resnet_model_v1.dat"


class DlibExtractor(Extractor):
    name = "dlib"
    dim = 128

    def __init__(
        self, *, upsample: int = 1, num_jitters: int = 0,
        max_detector_pixels: int = DEFAULT_MAX_DETECTOR_PIXELS,
    ) -> None:
        import dlib

        if upsample < 0 or num_jitters < 0 or max_detector_pixels < 1:
            raise ValueError("upsample and num_jitters must be >= 0, max_detector_pixels >= 1")
        self.upsample = upsample
        self.num_jitters = num_jitters
        self.max_detector_pixels = max_detector_pixels
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shapes = dlib.shape_predictor(
            str(model_dir() / "shape_predictor_5_face_landmarks.dat")
        )
        self._net = self._load_network()
        self.version = f"dlib-{dlib.__version__}/resnet_v1/frm-{importlib.metadata.version('face-recognition-models')}"

    def detect(self, image: np.ndarray) -> Detections:
        """HOG detection at a bounded cost (`detection_plan`); the boxes are mapped back to
        `image`, and the landmarks found on it, so alignment and embeddings always use the
        full-resolution face."""
        h, w = image.shape[:2]
        scale, upsample = detection_plan(h, w, self.upsample, self.max_detector_pixels)
        if scale == 1.0:
            rects, scores, _ = self._detector.run(image, upsample, 0.0)
        else:
            sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
            small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
            found, scores, _ = self._detector.run(small, 0, 0.0)
            fx, fy = w / sw, h / sh
            rects = [
                self._dlib.rectangle(round(r.left() * fx), round(r.top() * fy),
                                     round(r.right() * fx), round(r.bottom() * fy))
                for r in found
            ]
        if not rects:
            return Detections.empty(5)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32)
        landmarks = np.array(
            [[(p.x, p.y) for p in self._shapes(image, r).parts()] for r in rects], np.float32
        )
        return Detections(boxes, landmarks, np.asarray(scores, np.float32))

    def _load_network(self) -> Any:
        """dlib's own ResNet; `dlib-torch` overrides this to run the same weights in torch."""
        return self._dlib.face_recognition_model_v1(str(resnet_model_path()))

    def face_shapes(self, image: np.ndarray, detections: Detections) -> Any:
        """The 5-point shapes (dlib.full_object_detections) that place each face's chip."""
        dlib = self._dlib
        shapes = dlib.full_object_detections()
        for x1, y1, x2, y2 in detections.boxes:
            rect = dlib.rectangle(round(x1), round(y1), round(x2), round(y2))
            shapes.append(self._shapes(image, rect))
        return shapes

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        shapes = self.face_shapes(image, detections)
        vectors = self._net.compute_face_descriptor(image, shapes, self.num_jitters)
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(-1, self.dim)

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """HOG scores are SVM margins (0 at the detection threshold, 2.45 for a clear face),
        not probabilities: their logistic, in [0, 1] and monotonic in the score."""
        return 1.0 / (1.0 + np.exp(-np.asarray(scores, np.float64)))


@register_extractor("dlib")
def _create_dlib(**config: object) -> DlibExtractor:
    return DlibExtractor(**config)  # type: ignore[arg-type]
