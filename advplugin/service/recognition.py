"""The recognition steps every image route takes, whichever API family it answers: the bound
on an image's bytes, the keys a collection is matched with, extraction and protection of a
request's faces, and their boxes.

Public, in the service core, because two route families use them (the native routes in
`advplugin.service.routes.recognition`, CompreFace's in `advplugin.service.routes.compreface`):
an upload bound or a key-rotation check written once cannot differ between the two APIs.
Boxes come back as `FaceBox`, not as either API's schema; each route family shapes its own.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.datastructures import UploadFile

from advplugin.adapters import Detections
from advplugin.gallery.matcher import ProbeSet
from advplugin.images import ImageError
from advplugin.service.errors import ServiceError
from advplugin.service.state import KeyView, ServiceState


class FaceBox(NamedTuple):
    """A detected face's box in pixels, the detector's confidence in [0, 1] and its own score."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    probability: float
    score: float


def read_upload(state: ServiceState, file: UploadFile) -> bytes:
    """The bytes of a multipart file, read no further than one byte past the bound (so an
    oversized upload is refused without reading all of it)."""
    return check_upload(state, file.file.read(state.settings.max_upload_bytes + 1))


def check_upload(state: ServiceState, data: bytes) -> bytes:
    """The one bound of an image's bytes, however it came (multipart file, CompreFace's
    base64 JSON): at most `max_upload_bytes` decoded bytes (413), not empty (422). Base64
    once had a bound of its own, on the string, that let 2 bytes more through."""
    limit = state.settings.max_upload_bytes
    if len(data) > limit:
        raise ServiceError(413, "too_large", f"upload is larger than {limit} bytes")
    if not data:
        raise ServiceError(422, "invalid_image", "the uploaded file is empty")
    return data


def key_view(state: ServiceState, collection: str) -> KeyView:
    """The keys to match this collection with; 503 when some templates are under a key this
    service does not hold (a key rotation it was not started for): answers would be wrong."""
    view = state.collections.keys(collection)
    if view.unknown:
        raise ServiceError(503, "key_rotation", state.key_mismatch_message(view.unknown))
    return view


def current_key(state: ServiceState) -> KeyView:
    """Only the current key (during a rotation: the new one): what enrolments and comparisons
    of uploaded images use, since no stored template under another key is involved."""
    return KeyView(current=state.protection.expected.key_id, previous=None, unknown=[])


def protected_faces(
    state: ServiceState, data: bytes, view: KeyView, *, largest_only: bool, max_faces: int
) -> tuple[Detections, ProbeSet]:
    """Detect, embed and protect under every key of `view` (during a key rotation: the new
    and the previous key), admitted under the per-process cap; the raw embeddings never
    leave `state.extraction` (nor, with worker processes, the worker)."""
    if state.protection.extractor is None:
        raise ServiceError(
            422, "images_disabled",
            "this service runs in template mode (it holds no key): send protected templates "
            "to /enroll/templates or /identify/templates",
        )
    with state.extraction_slot():
        try:
            detections, probes = state.extraction.faces(
                data, view, largest_only=largest_only, max_faces=max_faces
            )
        except ImageError as e:
            raise ServiceError(422, "invalid_image", str(e)) from None
    if len(detections) == 0:
        raise ServiceError(422, "no_face", "no face found in the image")
    return detections, probes


def face_box(state: ServiceState, det: Detections, i: int) -> FaceBox:
    """The box of face `i`, with the detector's confidence mapped to [0, 1] by the extractor
    (boxes exist only in images mode, where the service holds an extractor)."""
    x1, y1, x2, y2 = (round(float(v)) for v in det.boxes[i])
    score = float(det.scores[i])
    assert state.protection.extractor is not None  # boxes exist only in images mode
    probability = float(state.protection.extractor.confidence(det.scores[i : i + 1])[0])
    return FaceBox(x_min=x1, y_min=y1, x_max=x2, y_max=y2, probability=probability, score=score)


__all__ = [
    "FaceBox",
    "check_upload",
    "current_key",
    "face_box",
    "key_view",
    "protected_faces",
    "read_upload",
]
