"""The insightface adapter on a real insightface `FaceAnalysis` (the installed package's own
loading, routing, detection post-processing, alignment and `Face` objects).

What is a stand-in, and why: no insightface model pack can be downloaded here, so the model
directory is built by `standin_models.py`. Its detector is a STAND-IN (a mean-face template
matcher in SCRFD's output layout, weaker than SCRFD but genuinely input-dependent); its
recognition model is the real ArcFace-style `../shared/models/mobileface.onnx` where present,
else a random-weight STAND-IN (then the identity test is skipped, the protection tests run).
Photos: LFW from $ADVPLUGIN_FACE_DATA, else the sample photos shipped inside insightface.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

insightface = pytest.importorskip("insightface", reason="insightface is an optional extra (install .[dev])")

from insightface.app import FaceAnalysis  # noqa: E402
from insightface.app.common import Face  # noqa: E402
from insightface.model_zoo import model_zoo  # noqa: E402
from insightface.model_zoo.arcface_onnx import ArcFaceONNX  # noqa: E402
from insightface.utils import face_align  # noqa: E402

from advplugin.adapters import create_extractor  # noqa: E402
from advplugin.adapters.insightface_adapter import (  # noqa: E402
    is_protected,
    protect_face_analysis,
    protect_recognition_model,
    unprotect_face_analysis,
)
from advplugin.images import load_image  # noqa: E402
from advplugin.keys import Key  # noqa: E402
from advplugin.protectors import create_protector  # noqa: E402
from tests.adapters import standin_models  # noqa: E402
from tests.conftest import FACE_DATA  # noqa: E402

#: The detector input size at which an LFW 250x250 photo's face matches the stand-in's
#: finest template (see standin_models.TEMPLATE_SIDES).
DET_SIZE = (192, 192)
N_IDENTITIES = 5


def lfw_available() -> bool:
    return (FACE_DATA / "lfw-dev").is_dir()


def lfw_people(start: int, count: int, per_person: int) -> list[tuple[str, list[np.ndarray]]]:
    """`count` LFW identities with at least `per_person` photos, in name order from `start`."""
    people = []
    for folder in sorted((FACE_DATA / "lfw-dev").iterdir())[start:]:
        files = sorted(folder.glob("*.jpg"))
        if len(files) >= per_person:
            people.append((folder.name, [load_image(f) for f in files[:per_person]]))
        if len(people) == count:
            break
    return people


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    # The mean face comes from identities (the first in name order) that no test uses.
    if lfw_available():
        template_images = [imgs[0] for _, imgs in lfw_people(0, 16, 1)]
    else:
        template_images = standin_models.insightface_sample_images()
    return standin_models.build_model_dir(tmp_path_factory.mktemp("insightface_models"), template_images)


@pytest.fixture(scope="session")
def people() -> list[tuple[str, list[np.ndarray]]]:
    """Test photos (RGB): two each of a few LFW people, or the insightface samples."""
    if lfw_available():
        return lfw_people(200, N_IDENTITIES, 2)
    return [(f"sample{i}", [img]) for i, img in enumerate(standin_models.insightface_sample_images())]


@pytest.fixture(scope="session")
def make_app(model_dir: tuple[Path, bool]) -> Callable[..., FaceAnalysis]:
    """A fresh, prepared FaceAnalysis per call (wrapping changes an app in place)."""
    folder, real_recognizer = model_dir

    def make(**kwargs: object) -> FaceAnalysis:
        app = FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"], **kwargs)
        if real_recognizer and "recognition" in app.models:
            # mobileface normalises pixels inside its graph; insightface's heuristic looks
            # for nodes named "Sub"/"Mul" and misses its lowercase names, so the deployment
            # sets the preprocessing, as it would for any model not from the model zoo.
            app.models["recognition"].input_mean = 0.0
            app.models["recognition"].input_std = 1.0
        app.prepare(ctx_id=-1, det_size=DET_SIZE)
        return app

    return make


@pytest.fixture(scope="session")
def embedding_dim(make_app: Callable[..., FaceAnalysis]) -> int:
    return make_app().models["recognition"].output_shape[-1]


@pytest.fixture
def protector(embedding_dim: int):
    return create_protector("xnn", key=Key.generate(), dim=embedding_dim)


def bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def photos(people: list[tuple[str, list[np.ndarray]]]) -> list[np.ndarray]:
    return [img for _, imgs in people for img in imgs]


def holds_vector(value: object, raw: np.ndarray) -> bool:
    """Independent of the adapter's own check: `raw` or a rescaled or negated copy of it
    (|cosine| > 0.999) in any d consecutive numbers of a float or int array, a list of
    numbers or float32 bytes, inside lists and dicts at any depth."""
    if isinstance(value, dict):
        return any(holds_vector(v, raw) for v in value.values())
    if isinstance(value, bytes):
        value = np.frombuffer(value[: len(value) // 4 * 4], np.float32)
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, int | float) for v in value):
            value = np.asarray(value)
        else:
            return any(holds_vector(v, raw) for v in value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        return False
    flat = np.nan_to_num(value.astype(np.float64).ravel())
    unit = raw / np.linalg.norm(raw)
    for start in range(0, flat.size - raw.size + 1):
        window = flat[start : start + raw.size]
        norm = np.linalg.norm(window)
        if norm > 0 and abs(float(window @ unit)) / norm > 0.999:
            return True
    return False


def face_values(face: Face) -> list[tuple[str, object]]:
    """Everything a caller can read from a Face: its items, its instance attributes and its
    public properties (normed_embedding, embedding_norm, sex, ...)."""
    values = list(face.items()) + list(vars(face).items())
    values += [(name, getattr(face, name)) for name in dir(type(face)) if isinstance(getattr(type(face), name), property)]
    return values


def test_wrapped_face_analysis_returns_protected_embeddings_without_raw_vector(make_app, protector, people):
    """The issue's must-show: same Face objects, protected embeddings, no raw vector anywhere."""
    plain, app = make_app(), make_app()
    assert protect_face_analysis(app, protector) is app
    checked = 0
    for img in photos(people):
        raw_faces, faces = plain.get(bgr(img)), app.get(bgr(img))
        assert len(faces) == len(raw_faces)
        for raw_face, face in zip(raw_faces, faces, strict=True):
            assert isinstance(face, Face)
            np.testing.assert_array_equal(face.bbox, raw_face.bbox)
            np.testing.assert_array_equal(face.kps, raw_face.kps)
            raw = raw_face.embedding.astype(np.float64)
            expected = protector.protect(raw_face.embedding[None])[0]
            np.testing.assert_allclose(face.embedding, expected, atol=1e-6)
            np.testing.assert_allclose(face.normed_embedding, expected / np.linalg.norm(expected), atol=1e-6)
            assert face.embedding.shape == (protector.output_dim,)
            for name, value in face_values(face):
                assert not holds_vector(value, raw), f"Face.{name} holds the raw embedding"
            assert abs(float(face.normed_embedding @ (raw / np.linalg.norm(raw)))) < 0.5
            checked += 1
    assert checked >= len(people), "the stand-in detector found too few faces to test"


def test_every_embedding_path_of_the_recognition_model_is_protected(make_app, protector, people):
    plain, app = make_app(), make_app()
    protect_face_analysis(app, protector)
    rec, raw_rec = app.models["recognition"], plain.models["recognition"]
    img = bgr(photos(people)[0])
    det = plain.get(img)[0]

    face = Face(bbox=det.bbox, kps=det.kps, det_score=det.det_score)
    returned = rec.get(img, face)
    expected = protector.protect(det.embedding[None])[0]
    np.testing.assert_allclose(returned, expected, atol=1e-6)
    np.testing.assert_allclose(face.embedding, expected, atol=1e-6)

    crops = [face_align.norm_crop(img, landmark=d.kps, image_size=112) for d in plain.get(img)[:2]]
    np.testing.assert_allclose(rec.get_feat(crops), protector.protect(raw_rec.get_feat(crops)), atol=1e-6)
    batch = np.stack(crops).transpose(0, 3, 1, 2)[:, ::-1].astype(np.float32)
    np.testing.assert_allclose(rec.forward(batch), protector.protect(raw_rec.forward(batch)), atol=1e-6)


def test_wrapping_is_idempotent_exclusive_and_reversible(make_app, protector, people):
    plain, app = make_app(), make_app()
    img = bgr(photos(people)[0])
    raw = plain.get(img)[0].embedding
    protect_face_analysis(app, protector)
    protect_face_analysis(app, protector)  # twice: still protected once
    protect_recognition_model(app.models["recognition"], protector)
    np.testing.assert_allclose(app.get(img)[0].embedding, protector.protect(raw[None])[0], atol=1e-6)

    other = create_protector("xnn", key=Key.generate(), dim=protector.dim)
    with pytest.raises(ValueError, match="already protected"):
        protect_face_analysis(app, other)
    with pytest.raises(ValueError, match="already protected"):
        protect_recognition_model(app.models["recognition"], other)

    assert unprotect_face_analysis(app) is app
    assert not is_protected(app) and not is_protected(app.models["recognition"])
    np.testing.assert_allclose(app.get(img)[0].embedding, raw, atol=1e-6)
    unprotect_face_analysis(app)  # a no-op on an unprotected app
    protect_face_analysis(app, other)  # after unwrapping, a new key may be used
    np.testing.assert_allclose(app.get(img)[0].embedding, other.protect(raw[None])[0], atol=1e-6)


def test_a_recognition_model_swapped_in_after_wrapping_is_protected(make_app, protector, people, model_dir):
    plain, app = make_app(), make_app()
    protect_face_analysis(app, protector)
    img = bgr(photos(people)[0])
    # The deployment reloads its recognition model after the plugin was installed.
    app.models["recognition"] = plain.models["recognition"]
    np.testing.assert_allclose(
        app.get(img)[0].embedding, protector.protect(make_app().get(img)[0].embedding[None])[0], atol=1e-6
    )


class LeakyArcFace(ArcFaceONNX):
    """A deployment's own recognition class (a subclass, as teams write) that also keeps the
    raw vector under other keys: a debug copy, a normalised copy inside a dict, a scaled
    copy in a list, a plain list, bytes, a quantised and negated copy behind a header."""

    def get(self, img, face):
        vec = super().get(img, face)
        face.debug_feature = vec.copy()
        face.extra = {"unit": vec / np.linalg.norm(vec), "quality": 1.0}
        face.history = [vec * 2.0]
        face.as_list = vec.tolist()
        face.blob = vec.astype(np.float32).tobytes()
        face.packed = np.concatenate([[7.0, 3.0], -np.round(vec * 100)]).astype(np.int32)
        return vec


def test_copies_of_the_raw_vector_under_other_keys_are_removed(make_app, protector, people, model_dir):
    app = make_app()
    real = app.models["recognition"]
    leaky = LeakyArcFace(model_file=real.model_file, session=real.session)
    leaky.input_mean, leaky.input_std = real.input_mean, real.input_std
    app.models["recognition"] = leaky
    img = bgr(photos(people)[0])
    raw = make_app().get(img)[0].embedding.astype(np.float64)

    protect_face_analysis(app, protector)
    face = app.get(img)[0]
    for name, value in face_values(face):
        assert not holds_vector(value, raw), f"Face.{name} holds the raw embedding"
    for key in ("debug_feature", "extra", "history", "as_list", "blob", "packed"):
        assert key not in face and getattr(face, key) is None


class BrokenArcFace(ArcFaceONNX):
    """A recognition model whose vector has a NaN (a faulty export) and which keeps a copy:
    protection fails, and the rest of the raw vector must not stay behind."""

    def get(self, img, face):
        vec = super().get(img, face).copy()
        vec[0] = np.nan
        face.embedding = vec
        face.copy_of_it = vec * 2.0
        return vec


def test_a_failed_protection_leaves_the_raw_vector_neither_on_the_face_nor_in_the_traceback(make_app, protector, people):
    app = make_app()
    real = app.models["recognition"]
    broken = BrokenArcFace(model_file=real.model_file, session=real.session)
    broken.input_mean, broken.input_std = real.input_mean, real.input_std
    protect_recognition_model(broken, protector)
    det = app.get(bgr(photos(people)[0]))[0]
    face = Face(bbox=det.bbox, kps=det.kps, det_score=det.det_score)
    with pytest.raises(ValueError, match="NaN") as failure:
        broken.get(bgr(photos(people)[0]), face)
    assert sorted(face.keys()) == ["bbox", "det_score", "kps"]
    assert face.embedding is None and face.copy_of_it is None
    # Nor in the exception: no frame of its traceback (below this test's own) holds it.
    raw = np.nan_to_num(make_app().get(bgr(photos(people)[0]))[0].embedding.astype(np.float64))
    raw[0] = 0.0
    tb = failure.value.__traceback__.tb_next
    while tb is not None:
        for name, value in tb.tb_frame.f_locals.items():
            assert not holds_vector(value, raw), f"{tb.tb_frame.f_code.co_name}: local {name} holds the raw vector"
        tb = tb.tb_next
    assert failure.value.__cause__ is None and failure.value.__context__ is None


def test_wrapped_app_cannot_be_pickled(make_app, protector):
    app = protect_face_analysis(make_app(), protector)
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        pickle.dumps(app)
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        pickle.dumps(app.models["recognition"])


def test_protected_scores_match_raw_scores_and_separate_people(make_app, protector, people, model_dir):
    plain, app = make_app(), protect_face_analysis(make_app(), protector)
    labels, raw, templates = [], [], []
    for name, imgs in people:
        for img in imgs:
            raw_faces = plain.get(bgr(img), max_num=1)
            if raw_faces:
                labels.append(name)
                raw.append(raw_faces[0].normed_embedding)
                templates.append(app.get(bgr(img), max_num=1)[0].normed_embedding)
    raw_scores = np.stack(raw) @ np.stack(raw).T
    scores = protector.score(np.stack(templates), np.stack(templates))
    # xnn with an orthogonal matrix keeps cosine scores: matching on templates is unchanged.
    np.testing.assert_allclose(scores, raw_scores, atol=1e-4)
    if not model_dir[1] or not lfw_available():
        pytest.skip("identity check needs the real recognition model and LFW (stand-in in use)")
    same = np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)
    different = ~np.equal.outer(labels, labels)
    assert same.any(), "the stand-in detector missed every same-person pair"
    assert scores[same].mean() > scores[different].mean()


def test_extractor_gives_the_deployments_raw_embeddings_even_from_a_protected_app(make_app, protector, people):
    plain, app = make_app(), make_app()
    protect_face_analysis(app, protector)
    extractor = create_extractor("insightface", app=app)
    assert extractor.dim == protector.dim and extractor.name == "insightface"
    img = photos(people)[0]  # RGB, as every advplugin extractor takes
    faces = extractor.extract(img)
    raw_faces = plain.get(bgr(img))
    assert len(faces.detections) == len(raw_faces)
    # Extractors answer faces largest first (CompreFace's order), stable among equal areas.
    area = [-(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in raw_faces]
    raw_faces = [raw_faces[j] for j in np.argsort(area, kind="stable")]
    for i, raw_face in enumerate(raw_faces):
        np.testing.assert_allclose(faces.detections.boxes[i], raw_face.bbox, atol=1e-4)
        np.testing.assert_allclose(faces.detections.landmarks[i], raw_face.kps, atol=1e-4)
        np.testing.assert_allclose(faces.embeddings[i], raw_face.embedding, atol=1e-5)
    # Reading raw embeddings for the pipeline did not unprotect the deployment's own path.
    np.testing.assert_allclose(
        app.get(bgr(img))[0].embedding, protector.protect(raw_faces[0].embedding[None])[0], atol=1e-6
    )


def test_extractor_raw_path_does_not_leak_into_concurrent_app_get(make_app, protector, people):
    """The extractor's raw switch is per thread: app.get in another thread at the same time
    still returns templates."""
    plain, app = make_app(), make_app()
    protect_face_analysis(app, protector)
    extractor = create_extractor("insightface", app=app)
    img = photos(people)[0]
    expected = protector.protect(plain.get(bgr(img))[0].embedding[None])[0]
    results: list[np.ndarray] = []
    start = threading.Barrier(2)

    def extract_loop() -> None:
        start.wait()
        for _ in range(15):
            extractor.extract(img)

    worker = threading.Thread(target=extract_loop)
    worker.start()
    start.wait()
    while worker.is_alive() or len(results) < 15:
        results.append(app.get(bgr(img))[0].embedding)
    worker.join()
    for embedding in results:
        np.testing.assert_allclose(embedding, expected, atol=1e-6)


def test_stand_in_detector_follows_the_face(make_app, people):
    """The stand-in detector depends on its input: nothing in a flat image, and a face moved
    by (dx, dy) gives a box moved by about (dx, dy) (within one 8-pixel detector cell)."""
    app = make_app()
    assert app.get(np.full((250, 250, 3), 128, np.uint8)) == []
    cv2 = pytest.importorskip("cv2")
    dx, dy = -30, 20
    moved = 0
    for img in photos(people):
        before = app.get(bgr(img))
        shifted = cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), (img.shape[1], img.shape[0]))
        after = app.get(bgr(shifted))
        if before and after:
            delta = after[0].bbox[:2] - before[0].bbox[:2]
            moved += bool(np.all(np.abs(delta - [dx, dy]) <= 12))
    assert moved >= 1


def test_extractor_errors_are_clear(make_app, model_dir):
    with pytest.raises(ValueError, match="prepare"):
        create_extractor("insightface", app=FaceAnalysis(name=str(model_dir[0]), providers=["CPUExecutionProvider"]))
    with pytest.raises(ValueError, match="no recognition model"):
        create_extractor("insightface", app=make_app(allowed_modules=["detection"]))
    with pytest.raises(ValueError, match="FaceAnalysis"):
        create_extractor("insightface", app=object())
    with pytest.raises(ValueError, match="expects"):
        protect_face_analysis(make_app(), create_protector("xnn", key=Key.generate(), dim=7))


def test_extract_central_falls_back_to_a_centre_box_without_landmarks(make_app, protector):
    extractor = create_extractor("insightface", app=make_app())
    vec, detected = extractor.extract_central(np.full((250, 250, 3), 90, np.uint8))
    assert not detected and vec.shape == (extractor.dim,) and np.isfinite(vec).all()


def test_get_model_recognizer_can_be_protected_alone(model_dir, protector, people, make_app):
    """Deployments that use model_zoo.get_model(...) without FaceAnalysis."""
    rec_file = next(p for p in model_dir[0].glob("rec_*.onnx"))
    rec = model_zoo.get_model(str(rec_file), providers=["CPUExecutionProvider"])
    ref = make_app().models["recognition"]
    rec.input_mean, rec.input_std = ref.input_mean, ref.input_std
    crop = np.zeros((112, 112, 3), np.uint8)
    raw = rec.get_feat(crop)
    protect_recognition_model(rec, protector)
    np.testing.assert_allclose(rec.get_feat(crop), protector.protect(raw), atol=1e-6)


def test_adapters_import_without_insightface():
    """insightface is optional: the registry still lists the adapter, creating it says what
    to install."""
    code = (
        "import sys; sys.modules['insightface'] = None\n"
        "from advplugin.adapters import create_extractor, list_extractors\n"
        "assert 'insightface' in list_extractors()\n"
        "try:\n    create_extractor('insightface', app=None)\n"
        "except ImportError as e:\n    assert 'advplugin[insightface]' in str(e); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
