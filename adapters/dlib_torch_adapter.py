"""`dlib-torch`: the `dlib` extractor with its ResNet run in torch.

Detection, 5-point landmarks and chip extraction are dlib's own, inherited from `dlib`
(`dlib.get_face_chips` at 150 x 150, padding 0.25: what `compute_face_descriptor` does
inside); only the network differs: the same `.dat` weights, parsed in Python and run by
`advplugin.nets.dlib_resnet`. Descriptors equal dlib's to float rounding (about 1e-6;
tests/adapters/test_dlib_torch.py), so a `dlib` cache and a `dlib-torch` one are
interchangeable. Why use it: batches of chips (`embed_chips`) run several times faster than
dlib's own network on a CPU (benchmarks/dlib_torch.py), and the network is differentiable.

torch is imported when the extractor is created, never when this module is imported.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np

from advplugin.adapters.base import Detections, register_extractor
from advplugin.adapters.dlib_adapter import DlibExtractor, resnet_model_path

#: dlib's chip padding in compute_face_descriptor (the fraction of the face added around it).
CHIP_PADDING = 0.25


class DlibTorchExtractor(DlibExtractor):
    name = "dlib-torch"

    def __init__(self, *, threads: int = 1, batch_size: int = 64, device: str = "auto", **config: Any) -> None:
        """`config`: the `dlib` extractor's options (upsample, max_detector_pixels...), except
        `num_jitters`, dlib's random test-time augmentation, which is not ported.

        `threads`: torch's intra-op threads, set for the whole process when the extractor is
        created (0 leaves torch's setting). One by default, like dlib's own network: callers
        parallelise over images or processes (`advplugin embed` runs one per core).

        `device`: "auto" runs the network on a GPU when the installed torch sees one and on
        the CPU otherwise (same descriptors within float tolerance; tests/gpu), or "cpu",
        "cuda", "cuda:N"."""
        if config.get("num_jitters", 0) != 0:
            raise ValueError("dlib-torch does not support num_jitters (dlib's random jitter)")
        self._threads, self._batch_size, self._device = threads, batch_size, device
        super().__init__(**config)
        self.version = (
            f"dlib-torch/resnet_v1/frm-{importlib.metadata.version('face-recognition-models')}"
            f"/torch-{importlib.metadata.version('torch')}"
        )

    def _load_network(self) -> Any:
        from advplugin.nets.dlib_resnet import ChipEmbedder

        return ChipEmbedder(
            resnet_model_path(), threads=self._threads, batch_size=self._batch_size, device=self._device
        )

    @property
    def chip_size(self) -> int:
        return int(self._net.model.input_size[0])

    def chips(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        """uint8 [N, 150, 150, 3] aligned chips of the detected faces, as dlib cuts them."""
        shapes = self.face_shapes(image, detections)
        found = self._dlib.get_face_chips(image, shapes, size=self.chip_size, padding=CHIP_PADDING)
        return (
            np.stack(found)
            if len(found)
            else np.zeros((0, self.chip_size, self.chip_size, 3), np.uint8)
        )

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """Raw embeddings [N, 128] of aligned chips as `chips` cuts them; any number, run in
        batches of `batch_size` (the fast path for many faces)."""
        return self._net(chips)

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        return self.embed_chips(self.chips(image, detections))


@register_extractor("dlib-torch")
def _create_dlib_torch(**config: Any) -> DlibTorchExtractor:
    return DlibTorchExtractor(**config)
