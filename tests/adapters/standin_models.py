"""Stand-in ONNX models for building a real insightface `FaceAnalysis` offline.

No insightface model pack (buffalo_l, antelopev2, ...) can be downloaded here, so the tests
assemble a model directory themselves:

- detection (STAND-IN): a template-matching face detector written as an ONNX graph with the
  9 outputs of insightface's SCRFD (scores, box distances and 5 keypoints for strides 8, 16
  and 32, two anchors per cell). It correlates the image with a *mean face* (normalised
  cross-correlation, one template size per stride), so the boxes and keypoints it reports
  genuinely follow the face in the input - move the face and the box moves - but it is a
  weak detector: frontal faces of roughly the template sizes only. insightface loads it
  through its own ModelRouter/SCRFD code, unchanged.
- recognition: the real ArcFace-style model `../shared/models/mobileface.onnx` where it is
  present; otherwise (STAND-IN) a small random-weight ArcFace-shaped network built here,
  whose embeddings are deterministic functions of the aligned crop but carry no identity.

The mean face is the average of ArcFace-aligned crops (dlib's 68 landmarks give the 5
points) of a few photos: LFW photos where the face data is present, else the sample images
shipped inside the insightface package. Nothing is written outside the given folder.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from advplugin.adapters.align import ARCFACE_TEMPLATE, align_face, arcface_points_from_dlib68
from advplugin.adapters.onnx_adapter import shape_predictor_68
from tests.conftest import SHARED_MODELS

MOBILEFACE = SHARED_MODELS / "mobileface.onnx"
INSIGHTFACE_SAMPLES = ("Tom_Hanks_54745.png", "t1.jpg")

#: Template side (pixels of the detector's input) for each SCRFD stride. Neighbouring sizes
#: differ by 2x; `prepare(det_size=...)` picks the scale at which a photo's faces match one.
TEMPLATE_SIDES = {8: 96, 16: 128, 32: 176}
#: Detection score = sigmoid(GAIN * (ncc - NCC_AT_HALF)): 0.5 where the normalised
#: cross-correlation with the mean face reaches NCC_AT_HALF.
NCC_AT_HALF = 0.35
GAIN = 12.0
#: Windows whose grey level varies less than this (input scaled to about -1..1) never score.
MIN_STD = 0.03
OPSET = 13


def insightface_sample_images() -> list[np.ndarray]:
    """RGB photos shipped with the insightface package (used where LFW is absent): Tom Hanks'
    ArcFace-aligned 112x112 crop framed like an LFW 250x250 photo (same face size and place,
    border replicated), and t1.jpg, a group photo with small faces."""
    import insightface

    folder = Path(insightface.__file__).parent / "data" / "images"
    face, group = (cv2.cvtColor(cv2.imread(str(folder / n)), cv2.COLOR_BGR2RGB) for n in INSIGHTFACE_SAMPLES)
    side, left, top = 127, 62, 52  # where LFW deep-funneled photos have the ArcFace frame
    face = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    framed = cv2.copyMakeBorder(face, top, 250 - side - top, left, 250 - side - left, cv2.BORDER_REPLICATE)
    return [framed, group]


@cache
def _hog_detector() -> Any:
    import dlib

    return dlib.get_frontal_face_detector()  # takes over a second to build: build it once


def arcface_landmarks(image: np.ndarray) -> np.ndarray:
    """ArcFace 5 points [N, 5, 2] of every face of 80 pixels or more that dlib's HOG detector
    finds (no upsampling: LFW faces are larger, and it is four times faster)."""
    shapes = shape_predictor_68()
    points = [
        arcface_points_from_dlib68(np.array([(p.x, p.y) for p in shapes(image, r).parts()]))
        for r in _hog_detector()(image, 0)
    ]
    return np.stack(points) if points else np.zeros((0, 5, 2), np.float32)


def mean_face(images: list[np.ndarray]) -> np.ndarray:
    """Average grey ArcFace-aligned 112x112 crop of every face dlib finds in `images`."""
    crops = [
        cv2.cvtColor(align_face(img, pts, 112), cv2.COLOR_RGB2GRAY).astype(np.float64)
        for img in images
        for pts in arcface_landmarks(img)
    ]
    if not crops:
        raise RuntimeError("no face found to build the stand-in detector's mean face")
    return np.mean(crops, axis=0)


#: The part of the ArcFace 112x112 frame the detector matches (x0, x1, y0, y1): eyes, nose
#: and mouth. Hair, ears and background vary too much between people to help.
INNER = (24, 88, 32, 104)


def _ncc_branch(nodes: list, inits: list, template: np.ndarray, stride: int) -> tuple[str, str, str]:
    """Add the nodes scoring one stride; returns the names of its score, box and kps outputs."""
    side = TEMPLATE_SIDES[stride]
    f = side / 112.0
    x0, x1, y0, y1 = INNER
    t = cv2.resize(template, (side, side), interpolation=cv2.INTER_AREA)
    t = t[round(y0 * f) : round(y1 * f), round(x0 * f) : round(x1 * f)]
    t = (t - t.mean()) / np.linalg.norm(t - t.mean())
    kh, kw = t.shape
    # Output cell (i, j) is centred on input pixel (j * stride, i * stride) like SCRFD's
    # anchors: kernel element (kh // 2, kw // 2) sits there; it is this ArcFace point.
    centre = np.array([x0 + (kw // 2) / f, y0 + (kh // 2) / f])
    pads = [kh // 2, kw // 2, kh - stride - kh // 2, kw - stride - kw // 2]
    p = f"s{stride}_"
    inits += [
        numpy_helper.from_array(t.astype(np.float32)[None, None], p + "tmpl"),
        numpy_helper.from_array(np.full((1, 1, kh, kw), 1.0 / t.size, np.float32), p + "avg"),
        numpy_helper.from_array(np.array([float(t.size)], np.float32), p + "n"),
    ]
    inits += [
        numpy_helper.from_array(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), p + "pads"),
        numpy_helper.from_array(np.array([t.size * MIN_STD**2], np.float32), p + "floor"),
    ]
    conv = {"strides": [stride, stride]}
    nodes += [
        # Replicate the border (zero padding would put a false edge around every image).
        helper.make_node("Pad", ["gray", p + "pads"], [p + "x"], mode="edge"),
        helper.make_node("Mul", [p + "x", p + "x"], [p + "x2"]),
        # ncc = sum(t * x) / sqrt(n * var(x)) over each window (t has zero mean, unit norm);
        # the floor keeps flat, featureless windows (std < MIN_STD) from scoring.
        helper.make_node("Conv", [p + "x", p + "tmpl"], [p + "num"], **conv),
        helper.make_node("Conv", [p + "x", p + "avg"], [p + "mean"], **conv),
        helper.make_node("Conv", [p + "x2", p + "avg"], [p + "meansq"], **conv),
        helper.make_node("Mul", [p + "mean", p + "mean"], [p + "mean2"]),
        helper.make_node("Sub", [p + "meansq", p + "mean2"], [p + "var"]),
        helper.make_node("Relu", [p + "var"], [p + "varpos"]),
        helper.make_node("Mul", [p + "varpos", p + "n"], [p + "energy"]),
        helper.make_node("Add", [p + "energy", p + "floor"], [p + "energy_eps"]),
        helper.make_node("Sqrt", [p + "energy_eps"], [p + "norm"]),
        helper.make_node("Div", [p + "num", p + "norm"], [p + "ncc"]),
        helper.make_node("Sub", [p + "ncc", "ncc_half"], [p + "shift"]),
        helper.make_node("Mul", [p + "shift", "gain"], [p + "logit"]),
        helper.make_node("Sigmoid", [p + "logit"], [p + "prob"]),
        # [1, 1, h, w] -> [h * w, 1] -> the same score for both anchors -> [h * w * 2, 1]
        helper.make_node("Reshape", [p + "prob", "shape_col"], [p + "col"]),
        helper.make_node("Concat", [p + "col", p + "col"], [p + "pair"], axis=1),
        helper.make_node("Reshape", [p + "pair", "shape_col"], [p + "score"]),
        helper.make_node("Mul", [p + "score", "zero"], [p + "zeros"]),
    ]
    # Box (the whole ArcFace frame) and keypoints are fixed offsets from the cell centre, in
    # units of the stride, since SCRFD multiplies them by the stride.
    dist = np.array([centre[0], centre[1], 112.0 - centre[0], 112.0 - centre[1]]) * f / stride
    kps = (ARCFACE_TEMPLATE - centre) * f / stride
    inits += [
        numpy_helper.from_array(dist.reshape(1, 4).astype(np.float32), p + "dist"),
        numpy_helper.from_array(kps.reshape(1, 10).astype(np.float32), p + "kdist"),
    ]
    nodes += [
        helper.make_node("Add", [p + "zeros", p + "dist"], [p + "bbox"]),
        helper.make_node("Add", [p + "zeros", p + "kdist"], [p + "kps"]),
    ]
    return p + "score", p + "bbox", p + "kps"


def save_graph(graph: onnx.GraphProto, path: Path) -> Path:
    """Check and write a graph as an opset-13, IR-8 model (what onnxruntime and insightface load)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="advplugin-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_template_detector(path: Path, template: np.ndarray) -> Path:
    """Write the stand-in SCRFD-layout detector for a 112x112 grey mean face."""
    nodes: list = []
    inits = [
        numpy_helper.from_array(np.array([NCC_AT_HALF], np.float32), "ncc_half"),
        numpy_helper.from_array(np.array([GAIN], np.float32), "gain"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "shape_col"),
    ]
    nodes += [
        helper.make_node("ReduceMean", ["input.1"], ["gray"], axes=[1], keepdims=1),
    ]
    branches = [_ncc_branch(nodes, inits, template, s) for s in sorted(TEMPLATE_SIDES)]
    widths = (1, 4, 10)
    outputs = []
    for kind in range(3):
        for stride, branch in zip(sorted(TEMPLATE_SIDES), branches, strict=True):
            name = f"{('score', 'bbox', 'kps')[kind]}_{stride}"
            nodes.append(helper.make_node("Identity", [branch[kind]], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{stride}", widths[kind]]))
    graph = helper.make_graph(
        nodes,
        "standin_template_detector",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs,
        inits,
    )
    return save_graph(graph, path)


def build_random_recognizer(path: Path, dim: int = 128, seed: int = 0) -> Path:
    """STAND-IN recognition model (used only where ../shared/models is absent): a fixed
    random conv + projection over a 112x112 crop, shaped like an ArcFace ONNX."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (16, 3, 8, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.02, (16 * 14 * 14, dim)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w1"], ["c1"], strides=[8, 8]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "flat"], ["f1"]),
        helper.make_node("MatMul", ["f1", "w2"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "standin_recognizer",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    return save_graph(graph, path)


def build_model_dir(folder: Path, template_images: list[np.ndarray]) -> tuple[Path, bool]:
    """A FaceAnalysis model directory: stand-in detector + recognition model.

    Returns the folder and whether the recognition model is the real mobileface (False:
    the random stand-in, whose scores carry no identity).
    """
    folder.mkdir(parents=True, exist_ok=True)
    build_template_detector(folder / "det_standin.onnx", mean_face(template_images))
    if MOBILEFACE.is_file():
        shutil.copyfile(MOBILEFACE, folder / "rec_mobileface.onnx")
        return folder, True
    build_random_recognizer(folder / "rec_standin.onnx")
    return folder, False
