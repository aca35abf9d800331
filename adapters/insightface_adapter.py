"""`insightface`: protect an existing insightface `FaceAnalysis` deployment in place.

A deployment built on insightface calls `app.get(img)` and reads `face.embedding` or
`face.normed_embedding`. `protect_face_analysis(app, protector)` keeps that code unchanged
but makes every path that yields an embedding yield a *protected template* instead:

- `FaceAnalysis.get` (which re-checks, on every call, that the recognition model it is
  about to use is still the protected one: a model swapped in later is protected too);
- the recognition model's `get(img, face)`: the raw vector is replaced on the `Face` before
  the call returns, and any other entry of the `Face` that holds it is removed;
- the recognition model's `get_feat(crops)` and `forward(batch)`, which deployments call
  directly on aligned crops (insightface's own `get` goes through `get_feat`).

Patching is per instance (other `FaceAnalysis` objects in the process are untouched),
idempotent for the same protector, refused for a different one (that would protect twice),
and reversible with `unprotect_face_analysis`. A wrapped app holds the protector, which
holds the key, so it cannot be pickled: workers build their own app and load the key file.

The `insightface` extractor (`create_extractor("insightface", app=...)`) is the other
direction: it lets advplugin's own pipeline (service, migration) use an insightface
deployment's detector and recognition model, returning raw embeddings for the caller to
protect, like every other adapter. It accepts a protected app too.

insightface is an optional extra: it is imported only when an object is wrapped or built.
Images: the extractor takes RGB like every adapter; insightface itself works on BGR.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from advplugin.adapters.align import ARCFACE_TEMPLATE
from advplugin.adapters.base import Detections, Extractor, register_extractor
from advplugin.protectors.base import Protector

#: Instance attribute naming the protection state on a wrapped app or recognition model.
STATE_ATTR = "_advplugin_protection"
#: Recognition-model methods that return embeddings (insightface 0.7 - 2.1 ArcFaceONNX).
EMBEDDING_METHODS = ("get", "get_feat", "forward")
#: |Cosine| above which stored numbers count as a copy (rescaled, negated) of the raw vector.
COPY_COSINE = 0.999


def _require_insightface() -> Any:
    try:
        import insightface
    except ImportError as e:
        raise ImportError(
            "the insightface adapter needs the optional extra: pip install 'advplugin[insightface]'"
        ) from e
    return insightface


def _embedding_dim(model: Any) -> int | None:
    shape = getattr(model, "output_shape", None)
    dim = shape[-1] if shape else None
    return dim if isinstance(dim, int) else None


def _as_numbers(value: Any) -> np.ndarray | None:
    """The numbers in an array, a list of numbers or raw bytes (float32), flattened; None
    for anything else."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return np.frombuffer(data[: len(data) // 4 * 4], dtype=np.float32)
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float | np.number) for v in value):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "fciu":
        return value.real.astype(np.float64).ravel()
    return None


def _holds_vector(value: Any, raw: np.ndarray) -> bool:
    """Whether `value` contains `raw` or a rescaled, negated or requantised copy of it (|cosine|
    above COPY_COSINE), at any offset, inside arrays, number lists, bytes, lists and dicts."""
    if isinstance(value, dict):
        return any(_holds_vector(v, raw) for v in value.values())
    flat = _as_numbers(value)
    if flat is None:
        return isinstance(value, list | tuple) and any(_holds_vector(v, raw) for v in value)
    d = raw.size
    if flat.size < d:
        return False
    # Non-finite entries compare as 0, so a vector with a NaN still matches its copies.
    flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    clean = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not clean.any():
        return False
    unit = clean / np.linalg.norm(clean)
    dots = np.correlate(flat, unit, mode="valid")  # one dot product per window of d values
    energy = np.cumsum(np.concatenate([[0.0], flat * flat]))
    norms = np.sqrt(np.maximum(energy[d:] - energy[:-d], 0.0))
    nonzero = norms > 1e-12
    return bool(np.any(np.abs(dots[nonzero]) / norms[nonzero] > COPY_COSINE))


def _scrub(face: Any, raw: np.ndarray, *, skip: str = "embedding") -> None:
    """Remove every entry of a `Face` (a dict whose items are mirrored as attributes)
    that holds the raw vector, under whatever key a recognition model put it. `skip` is the
    key the caller overwrites next anyway."""
    keys = set(face.keys()) if isinstance(face, dict) else set()
    keys |= set(getattr(face, "__dict__", {}))
    keys.discard(skip)
    for key in keys:
        stored = face.get(key) if isinstance(face, dict) else None
        attr = getattr(face, "__dict__", {}).get(key)
        if _holds_vector(stored, raw) or (attr is not stored and _holds_vector(attr, raw)):
            _drop(face, key)


def _drop(face: Any, key: str) -> None:
    if isinstance(face, dict):
        dict.pop(face, key, None)
    getattr(face, "__dict__", {}).pop(key, None)


class _Protection:
    """What one wrapped recognition model needs: the protector, its own original methods
    (to restore them) and a per-thread switch for the extractor's raw path."""

    def __init__(self, model: Any, protector: Protector) -> None:
        self.protector = protector
        self.saved = {name: model.__dict__[name] for name in EMBEDDING_METHODS if name in model.__dict__}
        self._local = threading.local()

    @property
    def raw_mode(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextmanager
    def raw(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def try_protect(self, raw: Any) -> tuple[np.ndarray | None, str | None]:
        """(templates, None), or (None, why) when the protector refuses the vectors (NaN, wrong
        dimension). Callers raise a fresh error once their own references to the raw vectors
        are gone: an exception's traceback keeps every frame's locals alive for whoever logs
        it (error trackers record them), so none of its frames may hold a raw vector."""
        try:
            arr = np.asarray(raw, dtype=np.float32)
            return self.protector.protect(arr.reshape(1 if arr.ndim < 2 else arr.shape[0], -1)), None
        except (ValueError, TypeError) as e:
            return None, f"cannot protect the embedding: {e}"

    def restore(self, obj: Any) -> None:
        """Put back the instance attributes the wrapping replaced (usually none: methods)."""
        for name in EMBEDDING_METHODS:
            obj.__dict__.pop(name, None)
        obj.__dict__.update(self.saved)


def _wrap_batch(state: _Protection, original: Callable[..., Any]) -> Callable[..., np.ndarray]:
    """get_feat / forward: aligned crops in, templates [N, output_dim] out."""

    def protected(*args: Any, **kwargs: Any) -> np.ndarray:
        out = original(*args, **kwargs)
        if state.raw_mode:
            return out
        templates, error = state.try_protect(out)
        if templates is None:
            del out
            raise ValueError(error)
        return templates

    protected.__doc__ = original.__doc__
    return protected


def _wrap_get(state: _Protection, original: Callable[..., Any]) -> Callable[..., np.ndarray | None]:
    """get(img, face): sets `face.embedding` to the template and returns it."""

    def protected(img: np.ndarray, face: Any, *args: Any, **kwargs: Any) -> np.ndarray | None:
        with state.raw():  # the original may call get_feat: let it return the raw vector once
            out = original(img, face, *args, **kwargs)
        raw = face.get("embedding") if isinstance(face, dict) else getattr(face, "embedding", None)
        if raw is None:
            raw = out
        if raw is None:  # the model chose not to embed this face
            return None
        raw = np.asarray(raw, dtype=np.float32).ravel()
        if state.raw_mode:  # the extractor's own call: it protects downstream
            return raw
        templates, error = state.try_protect(raw[None, :])
        if templates is None:  # e.g. a NaN vector: fail, leaving the raw vector nowhere
            _drop(face, "embedding")
            _scrub(face, raw)
            del raw, out
            raise ValueError(error)
        _scrub(face, raw)
        face.embedding = templates[0]
        return templates[0]

    protected.__doc__ = original.__doc__
    return protected


def protect_recognition_model(model: Any, protector: Protector) -> Any:
    """Make an insightface recognition model (e.g. `ArcFaceONNX` from `model_zoo.get_model`)
    return protected templates from `get`, `get_feat` and `forward`. Returns the model."""
    if not isinstance(protector, Protector):
        raise TypeError(f"protector must be an advplugin Protector, got {type(protector).__name__}")
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        if state.protector is protector:
            return model
        raise ValueError(
            "this recognition model is already protected with another protector; "
            "unprotect it first (protecting twice would chain two keys)"
        )
    if not callable(getattr(model, "get", None)):
        raise TypeError(f"{type(model).__name__} is not an insightface recognition model (no get method)")
    dim = _embedding_dim(model)
    if dim is not None and dim != protector.dim:
        raise ValueError(f"the recognition model gives {dim}-d embeddings but the protector expects {protector.dim}")
    state = _Protection(model, protector)
    for name in EMBEDDING_METHODS:
        original = getattr(model, name, None)
        if callable(original):
            wrap = _wrap_get if name == "get" else _wrap_batch
            setattr(model, name, wrap(state, original))
    setattr(model, STATE_ATTR, state)
    return model


def unprotect_recognition_model(model: Any) -> Any:
    """Restore the methods `protect_recognition_model` replaced. Returns the model."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        state.restore(model)
    return model


def _recognition_model(app: Any) -> Any:
    models = getattr(app, "models", None)
    if not isinstance(models, dict) or "recognition" not in models:
        raise ValueError("this FaceAnalysis has no recognition model: there is no embedding to protect")
    return models["recognition"]


def protect_face_analysis(app: Any, protector: Protector) -> Any:
    """Wrap an insightface `FaceAnalysis` in place so that `app.get(img)` returns `Face`
    objects whose `embedding`/`normed_embedding` are protected templates. Returns `app`.

    Idempotent for the same protector; raises for a different one.
    """
    _require_insightface()
    state = app.__dict__.get(STATE_ATTR)
    if state is not None and state.protector is not protector:
        raise ValueError(
            "this FaceAnalysis is already protected with another protector; "
            "call unprotect_face_analysis(app) first (protecting twice would chain two keys)"
        )
    protect_recognition_model(_recognition_model(app), protector)
    if state is not None:
        return app
    state = _Protection(app, protector)  # saves what `get` was before it is replaced
    original_get = app.get

    def get(img: np.ndarray, *args: Any, **kwargs: Any) -> list[Any]:
        # A deployment may replace app.models["recognition"] after wrapping: protect the
        # model actually used, on every call, before any embedding is computed.
        protect_recognition_model(_recognition_model(app), protector)
        return original_get(img, *args, **kwargs)

    get.__doc__ = original_get.__doc__
    app.__dict__["get"] = get
    app.__dict__[STATE_ATTR] = state
    return app


def unprotect_face_analysis(app: Any) -> Any:
    """Undo `protect_face_analysis`: `app.get` and the recognition model return raw
    embeddings again. Returns `app`."""
    state = app.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return app
    state.restore(app)
    for model in getattr(app, "models", {}).values():
        unprotect_recognition_model(model)
    return app


def is_protected(app_or_model: Any) -> bool:
    return getattr(app_or_model, "__dict__", {}).get(STATE_ATTR) is not None


@contextmanager
def _raw_embeddings(model: Any) -> Iterator[None]:
    """Let the extractor read raw embeddings from a possibly protected model (this thread only)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        yield
    else:
        with state.raw():
            yield


def _box_landmarks(box: np.ndarray) -> np.ndarray:
    """ArcFace points placed in a box taken as the aligned crop (for boxes without landmarks,
    such as the centre fallback of pre-cropped photos)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (ARCFACE_TEMPLATE / 112.0 * [x2 - x1, y2 - y1] + [x1, y1]).astype(np.float32)


class InsightFaceExtractor(Extractor):
    """An insightface deployment (its detector and recognition model) as an advplugin extractor.

    Landmarks are the detector's 5 points (ArcFace order). Addons such as liveness are the
    deployment's `app.get` business and are not run here.
    """

    name = "insightface"

    def __init__(self, *, app: Any) -> None:
        insightface = _require_insightface()
        self._face_cls = insightface.app.common.Face
        if getattr(app, "det_model", None) is None:
            raise ValueError("app must be an insightface FaceAnalysis with a detection model")
        self._recognizer = _recognition_model(app)
        if not hasattr(app, "det_size"):
            raise ValueError("call app.prepare(ctx_id=..., det_size=...) before creating the extractor")
        dim = _embedding_dim(self._recognizer)
        if dim is None:
            raise ValueError("the recognition model's output dimension is not static")
        self.dim = dim
        self._app = app
        model_file = getattr(self._recognizer, "model_file", None)
        digest = (
            hashlib.sha256(Path(model_file).read_bytes()).hexdigest()[:12]
            if model_file and Path(model_file).is_file()
            else "unknown"
        )
        stem = Path(model_file).stem if model_file else type(self._recognizer).__name__
        self.version = f"insightface-{insightface.__version__}/{stem}-{digest}"

    def detect(self, image: np.ndarray) -> Detections:
        bgr = np.ascontiguousarray(image[..., ::-1])
        bboxes, kpss = self._app.det_model.detect(bgr, max_num=0, metric="default")
        if len(bboxes) == 0:
            return Detections.empty(5)
        landmarks = np.zeros((len(bboxes), 0, 2), np.float32) if kpss is None else kpss
        return Detections(
            np.asarray(bboxes[:, :4], np.float32),
            np.asarray(landmarks, np.float32),
            np.asarray(bboxes[:, 4], np.float32),
        )

    def embed(self, image: np.ndarray, detections: Detections) -> np.ndarray:
        bgr = np.ascontiguousarray(image[..., ::-1])
        out = []
        for box, lm, score in zip(detections.boxes, detections.landmarks, detections.scores, strict=True):
            kps = lm if lm.shape == (5, 2) else _box_landmarks(box)
            face = self._face_cls(bbox=box, kps=kps, det_score=score)
            with _raw_embeddings(self._recognizer):
                vec = self._recognizer.get(bgr, face)
            out.append(np.asarray(vec, np.float32).reshape(self.dim))
            del face
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


@register_extractor("insightface")
def _create_insightface(**config: object) -> InsightFaceExtractor:
    return InsightFaceExtractor(**config)  # type: ignore[arg-type]
