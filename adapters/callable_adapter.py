"""`callable`: wrap any function image -> vector (a team's own extractor).

The function receives the whole RGB uint8 image and returns one vector (or [1, D]); the
adapter treats the image as one face with a full-frame box and no landmarks. Teams whose
function also detects faces should write a small Extractor subclass instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from advplugin.adapters.base import Detections, Extractor, register_extractor


class CallableExtractor(Extractor):
    name = "callable"

    def __init__(
        self, *, fn: Callable[[np.ndarray], np.ndarray], dim: int, version: str = "1"
    ) -> None:
        if not callable(fn):
            raise ValueError("`fn` must be callable: image -> vector")
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self._fn = fn
        self.dim = dim
        self.version = f"{getattr(fn, '__qualname__', type(fn).__name__)}-{version}"

    def detect(self, image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        return Detections(
            np.array([[0, 0, w, h]], np.float32),
            np.zeros((1, 0, 2), np.float32),
            np.ones(1, np.float32),
        )

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        out = []
        for _ in range(len(detections)):
            vec = np.asarray(self._fn(image), dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                raise ValueError(
                    f"the extractor function returned dimension {vec.shape[0]}, expected {self.dim}"
                )
            out.append(vec)
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


@register_extractor("callable")
def _create_callable(**config: object) -> CallableExtractor:
    return CallableExtractor(**config)  # type: ignore[arg-type]
