"""The `onnx` adapter with a real ArcFace-style model (../shared/models/mobileface.onnx: 112x112
RGB crops, pixels 0..255, normalised inside the graph, so mean=0 and std=1 here) on real LFW
photos. mobileface is much weaker than dlib's ResNet (about 94 % on LFW pairs against 98.7 %),
so the identity test asks for ranking, not for a figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from advplugin.adapters import create_extractor
from advplugin.adapters.align import ARCFACE_TEMPLATE, align_face
from advplugin.adapters.onnx_adapter import OnnxExtractor
from advplugin.images import load_image
from tests.adapters.standin_models import MOBILEFACE, save_graph

N_IDENTITIES = 6
PER_PERSON = 2


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not MOBILEFACE.is_file():
        pytest.skip(f"no ArcFace-style model at {MOBILEFACE} (../shared/models is absent)")
    return MOBILEFACE


@pytest.fixture(scope="session")
def extractor(model_path: Path) -> OnnxExtractor:
    return create_extractor("onnx", model_path=model_path, mean=0.0, std=1.0)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def lfw_embeddings(extractor: OnnxExtractor, face_data: Path) -> tuple[list[str], np.ndarray, int]:
    """One embedding per photo (face nearest the centre) for a few LFW people."""
    labels, vectors, detected = [], [], 0
    folders = [f for f in sorted((face_data / "lfw-dev").iterdir()) if len(list(f.glob("*.jpg"))) >= PER_PERSON]
    for folder in folders[40 : 40 + N_IDENTITIES]:
        for path in sorted(folder.glob("*.jpg"))[:PER_PERSON]:
            vec, found = extractor.extract_central(load_image(path))
            labels.append(folder.name)
            vectors.append(vec)
            detected += found
    return labels, np.stack(vectors), detected


def build_onnx(path: Path, input_shape: list, *, dynamic_output: bool = False) -> Path:
    """A tiny valid ONNX model: [N, 4] from a global average pool, or with `dynamic_output`
    an output whose last dimension is only known at run time (NonZero)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["proj"]),
    ]
    if dynamic_output:
        nodes += [
            helper.make_node("NonZero", ["proj"], ["nz"]),
            helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT),
        ]
        out_shape: list = [2, "D"]
    else:
        nodes.append(helper.make_node("Identity", ["proj"], ["y"]))
        out_shape = ["N", 4]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
    )
    return save_graph(graph, path)


def test_same_person_scores_higher_than_different_people(lfw_embeddings):
    labels, vectors, detected = lfw_embeddings
    assert detected >= len(labels) // 2, "dlib's detector found too few of the LFW faces"
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit.T
    same = np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)
    different = ~np.equal.outer(labels, labels)
    assert scores[same].mean() > scores[different].mean()
    # Each photo's best match among the others is its own person more often than not.
    np.fill_diagonal(scores, -np.inf)
    hits = np.array(labels)[scores.argmax(axis=1)] == np.array(labels)
    assert hits.mean() > 0.5


def test_extractor_describes_the_model(extractor, model_path):
    assert extractor.dim == 256 and extractor.input_size == 112
    assert extractor.version.startswith(model_path.stem)
    faces = extractor.extract(np.zeros((120, 120, 3), np.uint8))
    assert len(faces.detections) == 0 and faces.embeddings.shape == (0, 256)


def test_preprocessing_settings_change_what_the_model_sees(model_path, extractor):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    rgb = extractor.embed_aligned(crops)
    bgr_model = create_extractor("onnx", model_path=model_path, mean=0.0, std=1.0, channels="bgr")
    # A BGR model fed BGR crops sees exactly what an RGB model fed RGB crops sees.
    np.testing.assert_allclose(bgr_model.embed_aligned(crops[..., ::-1]), rgb, rtol=1e-5, atol=1e-5)
    assert not np.allclose(bgr_model.embed_aligned(crops), rgb, atol=1e-3)
    # The ArcFace default (x - 127.5) / 127.5 would normalise twice for this model.
    default = create_extractor("onnx", model_path=model_path)
    assert not np.allclose(default.embed_aligned(crops), rgb, atol=1e-3)


def test_models_with_a_fixed_batch_size_embed_any_number_of_faces(tmp_path):
    """Some exports fix the batch dimension (1 or more): crops go in that many at a time."""
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    # build_onnx's model: per-channel mean of the normalised crop, times a 3x4 matrix of ones.
    pooled = (crops.astype(np.float64) - 127.5) / 127.5
    expected = np.repeat(pooled.mean(axis=(1, 2)).sum(axis=1, keepdims=True), 4, axis=1)
    for batch in (1, 2):
        model = build_onnx(tmp_path / f"b{batch}.onnx", [batch, 3, 112, 112])
        fixed = create_extractor("onnx", model_path=model)
        np.testing.assert_allclose(fixed.embed_aligned(crops), expected, atol=1e-6)


def test_alignment_matches_insightface_norm_crop():
    """align.py against an independent implementation of the same ArcFace warp."""
    face_align = pytest.importorskip("insightface.utils.face_align")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (ARCFACE_TEMPLATE - 56) @ rot.T * 1.4 + [125, 118]
    ours = align_face(image, points.astype(np.float32), 112).astype(np.int16)
    theirs = face_align.norm_crop(image, landmark=points.astype(np.float32), image_size=112).astype(np.int16)
    assert np.abs(ours - theirs).mean() < 1.0


def test_bad_model_path_and_config_give_clear_errors(tmp_path, model_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_extractor("onnx", model_path=tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        create_extractor("onnx", model_path=garbage)
    with pytest.raises(ValueError, match="square"):
        create_extractor("onnx", model_path=build_onnx(tmp_path / "rect.onnx", ["N", 3, 112, 96]))
    with pytest.raises(ValueError, match="square"):
        create_extractor("onnx", model_path=build_onnx(tmp_path / "dyn.onnx", ["N", 3, "H", "W"]))
    with pytest.raises(ValueError, match="static"):
        create_extractor("onnx", model_path=build_onnx(tmp_path / "dyn_out.onnx", ["N", 3, 112, 112], dynamic_output=True))
    with pytest.raises(ValueError, match="channels"):
        create_extractor("onnx", model_path=model_path, channels="rbg")
    with pytest.raises(ValueError, match="mean"):
        create_extractor("onnx", model_path=model_path, mean=(0.0, 1.0))
    with pytest.raises(ValueError, match="std"):
        create_extractor("onnx", model_path=model_path, std=0.0)
    with pytest.raises(TypeError):
        create_extractor("onnx", model_path=model_path, size=112)
    with pytest.raises(ValueError, match="unknown extractor"):
        create_extractor("onnxx", model_path=model_path)
