"""`dlib-torch`: dlib's detector and alignment with the ResNet in torch gives dlib's
descriptors, through the extractor API and through `advplugin embed`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from advplugin.adapters import Extractor, create_extractor, list_extractors
from advplugin.cli.main import main
from advplugin.embedding_files import load_embedding_set
from advplugin.images import load_image


@pytest.fixture(scope="module")
def torch_extractor() -> Iterator[Extractor]:
    """Created with its default threads=1, which sets torch's process-wide thread count:
    restored afterwards so later tests see what they expect."""
    import torch

    before = torch.get_num_threads()
    yield create_extractor("dlib-torch")
    torch.set_num_threads(before)


def test_registered_and_torch_only_when_created() -> None:
    assert "dlib-torch" in list_extractors()
    script = (
        "import sys, advplugin.adapters as a\n"
        "print('torch' in sys.modules)\n"
        "a.create_extractor('dlib-torch')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="num_jitters"):
        create_extractor("dlib-torch", num_jitters=2)
    with pytest.raises(ValueError, match="upsample"):
        create_extractor("dlib-torch", upsample=-1)


def test_same_faces_and_descriptors_as_dlib(
    torch_extractor: Extractor, packaged_images: Path
) -> None:
    """A group photo: the same boxes and landmarks (dlib's code), the same embeddings."""
    image = load_image(packaged_images / "t1.jpg")
    got = torch_extractor.extract(image)
    expected = create_extractor("dlib").extract(image)
    assert len(got.detections) >= 3
    np.testing.assert_array_equal(got.detections.boxes, expected.detections.boxes)
    np.testing.assert_array_equal(got.detections.landmarks, expected.detections.landmarks)
    assert got.embeddings.dtype == np.float32
    assert np.abs(got.embeddings - expected.embeddings).max() < 1e-4
    chips = torch_extractor.chips(image, got.detections)  # type: ignore[attr-defined]
    assert chips.shape == (len(got.detections), 150, 150, 3) and chips.dtype == np.uint8
    assert torch_extractor.description["name"] == "dlib-torch"


FACES = 500


@pytest.fixture(scope="module")
def lfw_500(face_data: Path, lfw_cache, tmp_path_factory) -> Path:
    """Whole lfw-dev identities, linked into a folder, until >= 500 photos; the identities
    holding photos where dlib finds no face (the centre-box fallback) come first, so that
    both paths are compared."""
    identity, detected = lfw_cache["identity"], lfw_cache["detected"]
    fallback = sorted({str(n) for n in identity[detected == 0]})[:5]
    names = fallback + [n for n in sorted(set(map(str, identity))) if n not in fallback]
    root = tmp_path_factory.mktemp("lfw500")
    total = 0
    for name in names:
        if total >= FACES:
            break
        (root / name).symlink_to(face_data / "lfw-dev" / name)
        total += int((identity == name).sum())
    return root


@pytest.mark.slow
def test_embed_reproduces_the_dlib_cache_on_500_faces(lfw_500: Path, lfw_cache, tmp_path) -> None:
    """`advplugin embed --extractor dlib-torch` against the shipped `dlib` cache (made by
    `advplugin embed --extractor dlib`, which tests/adapters/test_dlib.py and
    tests/cli/test_cli.py check), row by row."""
    out = tmp_path / "torch.npz"
    args = ["embed", str(lfw_500), "--out", str(out), "--extractor", "dlib-torch", "--workers", "2"]
    assert main(args) == 0
    got = load_embedding_set(out)
    index = {p: i for i, p in enumerate(lfw_cache["path"])}
    rows = np.array([index[p] for p in got.path])
    assert len(rows) >= FACES
    np.testing.assert_array_equal(got.detected, lfw_cache["detected"][rows])
    assert (got.detected == 0).any() and (got.detected == 1).any()
    assert np.abs(got.embedding - lfw_cache["embedding"][rows]).max() < 1e-4
