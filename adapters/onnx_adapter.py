"""`onnx`: any ArcFace-style ONNX recognition model.

The model sees square aligned crops (112x112 unless its input says otherwise), aligned from
5 landmarks with the standard ArcFace template. A recognition ONNX has no detector, so
faces are found by dlib's HOG detector and its 68-point predictor (shipped offline), which
also gives the 5 ArcFace points. Landmarks returned are those 5 points, ArcFace order.
Preprocessing is configurable because models differ: `mean`/`std` per channel (applied as
(x - mean) / std to 0..255 pixels) and channel order (`rgb` or `bgr`).
"""

from __future__ import annotations

import hashlib
import logging
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from advplugin.adapters.align import align_face, arcface_points_from_dlib68
from advplugin.adapters.base import Detections, Extractor, register_extractor
from advplugin.adapters.dlib_adapter import model_dir

log = logging.getLogger("advplugin.adapters")


def onnx_providers() -> list[str]:
    """CUDA when onnxruntime-gpu is installed, the CPU otherwise (same results)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        _preload_cuda_libraries()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@cache
def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu loads its CUDA provider when a session starts, and the provider needs
    CUDA and cuDNN libraries the loader can find; `preload_dlls` (onnxruntime >= 1.21) loads
    them from the nvidia-* pip packages (onnxruntime-gpu's `cuda` and `cudnn` extras, or
    PyTorch's) where they are installed. Best effort: without them a session falls back to
    the CPU, as it would anyway. Once per process."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # a missing library: onnxruntime says so and uses the CPU
        log.info("onnxruntime could not preload CUDA libraries (%s); sessions may run on the CPU", type(e).__name__)


@cache
def shape_predictor_68() -> Any:
    """dlib's 68-point model (100 MB, seconds to load): loaded once per process, on first
    use, so that extractors used only on aligned crops never pay for it. Read-only."""
    import dlib

    return dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))


def _channel_values(value: float | tuple[float, float, float], what: str) -> np.ndarray:
    """One number or one per channel, as float32 [3]; a clear error for anything else."""
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size not in (1, 3) or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be one finite number or three (one per channel), got {arr.size} values")
    return np.broadcast_to(arr, (3,)).copy()


class OnnxExtractor(Extractor):
    name = "onnx"

    def __init__(
        self,
        *,
        model_path: str | Path,
        mean: float | tuple[float, float, float] = 127.5,
        std: float | tuple[float, float, float] = 127.5,
        channels: Literal["rgb", "bgr"] = "rgb",
        upsample: int = 1,
        threads: int = 0,
    ) -> None:
        import dlib
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found")
        if channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
        mean_arr, std_arr = _channel_values(mean, "mean"), _channel_values(std, "std")
        if (std_arr <= 0).any():
            raise ValueError("std must be positive for every channel")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(path), options, providers=onnx_providers())
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            raise ValueError(f"{path.name} is not a loadable ONNX model ({type(e).__name__})") from None
        inp = self._session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[2] != shape[3] or not isinstance(shape[2], int):
            raise ValueError(f"{path.name}: expected a square NCHW input, got {shape}")
        self.input_size = int(shape[2])
        self._input_name = inp.name
        # Some exports fix the batch size (often 1); feed them that many crops at a time.
        self._batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_dim = self._session.get_outputs()[0].shape[-1]
        if not isinstance(out_dim, int):
            raise ValueError(f"{path.name}: output dimension must be static, got {out_dim}")
        self.dim = out_dim
        self.mean = mean_arr.reshape(1, 3, 1, 1)
        self.std = std_arr.reshape(1, 3, 1, 1)
        self.channels = channels
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.version = f"{path.stem}-{digest}"
        self.upsample = upsample
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()

    def detect(self, image: np.ndarray) -> Detections:
        rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        if not rects:
            return Detections.empty(5)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float32)
        landmarks = np.stack([self._arcface_points(image, b) for b in boxes])
        return Detections(boxes, landmarks, np.asarray(scores, np.float32))

    def _arcface_points(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        x1, y1, x2, y2 = (round(v) for v in box)
        shape = shape_predictor_68()(image, self._dlib.rectangle(x1, y1, x2, y2))
        return arcface_points_from_dlib68(np.array([(p.x, p.y) for p in shape.parts()]))

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        crops = []
        for box, lm in zip(detections.boxes, detections.landmarks, strict=True):
            points = lm if lm.shape == (5, 2) else self._arcface_points(image, box)
            crops.append(align_face(image, points, self.input_size))
        return self.embed_aligned(np.stack(crops)) if crops else np.zeros((0, self.dim), np.float32)

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """Raw embeddings for already aligned RGB uint8 crops [N, S, S, 3]."""
        x = crops.astype(np.float32)
        if self.channels == "bgr":
            x = x[..., ::-1]
        x = np.ascontiguousarray((x.transpose(0, 3, 1, 2) - self.mean) / self.std, np.float32)
        if self._batch is None:
            out = self._session.run(None, {self._input_name: x})[0]
            return np.asarray(out, np.float32).reshape(len(crops), self.dim)
        outs = []
        for start in range(0, len(x), self._batch):
            chunk = x[start : start + self._batch]
            n = len(chunk)
            if n < self._batch:  # pad the last chunk to the fixed batch size
                chunk = np.concatenate([chunk, np.zeros((self._batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(self._session.run(None, {self._input_name: chunk})[0], np.float32)[:n])
        return np.concatenate(outs).reshape(len(crops), self.dim)


@register_extractor("onnx")
def _create_onnx(**config: object) -> OnnxExtractor:
    return OnnxExtractor(**config)  # type: ignore[arg-type]
