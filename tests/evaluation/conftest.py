"""Fixtures of the evaluation tests: a small identity-disjoint LFW split (symlinks) and the
independent scorer model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from advplugin.evaluation.data import list_images
from tests.conftest import SHARED_MODELS

SCORER = SHARED_MODELS / "mobileface.onnx"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The networks here are tiny: one thread avoids oversubscribing a shared machine (two
    threads competing with other jobs made them several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scorer_model() -> Path:
    if not SCORER.is_file():
        pytest.skip(f"scorer model not found at {SCORER}")
    return SCORER


@pytest.fixture(scope="session")
def small_split(face_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train: 10 people, test: 8 other people, 3 or 4 LFW photos each, as symlink folders."""
    lfw = list_images(face_data / "lfw-dev")
    names = sorted({str(n) for n in lfw.identity if 3 <= (lfw.identity == n).sum() <= 4})
    root = tmp_path_factory.mktemp("split")
    for side, people in (("train", names[:10]), ("test", names[10:18])):
        for name in people:
            (root / side / name).mkdir(parents=True)
            for rel in lfw.path[lfw.identity == name]:
                (root / side / str(rel)).symlink_to(lfw.root / str(rel))
    return {"train": root / "train", "test": root / "test", "lfw": face_data / "lfw-dev"}
