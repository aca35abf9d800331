"""Raw embeddings (seeded content-hash cache), aligned crops and scorer embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advplugin.adapters import create_extractor
from advplugin.evaluation.data import list_images
from advplugin.evaluation.faces import aligned_faces, hash_files, raw_embeddings, scorer_embeddings


@pytest.fixture(scope="module")
def dlib_extractor():
    return create_extractor("dlib")


def test_seeded_cache_matches_the_extractor(
    small_split: dict[str, Path], face_data: Path, dlib_extractor, tmp_path: Path
) -> None:
    folder = list_images(small_split["test"])
    folder = folder.subset(np.arange(3))
    digests = hash_files(folder, progress=False)
    seeded, found = raw_embeddings(
        folder,
        digests,
        dlib_extractor,
        cache_dir=tmp_path,
        seed_file=face_data / "lfw-dev-dlib128.npz",
        progress=False,
    )
    computed, found2 = raw_embeddings(
        folder, digests, dlib_extractor, cache_dir=None, progress=False
    )
    assert np.array_equal(found, found2)
    assert np.allclose(seeded, computed, atol=1e-5)


def test_cache_hit_never_recomputes(
    small_split: dict[str, Path], dlib_extractor, tmp_path: Path
) -> None:
    folder = list_images(small_split["train"]).subset(np.arange(2))
    digests = hash_files(folder, progress=False)
    first, _ = raw_embeddings(folder, digests, dlib_extractor, cache_dir=tmp_path, progress=False)

    def refuse(image: np.ndarray) -> np.ndarray:
        raise AssertionError("a cached image was embedded again")

    # A stand-in extractor with the same name/version as dlib, whose only job is to fail if
    # the cache is bypassed (a real second extractor cannot prove that).
    standin = create_extractor("callable", fn=refuse, dim=128)
    standin.name, standin.version = dlib_extractor.name, dlib_extractor.version
    second, _ = raw_embeddings(folder, digests, standin, cache_dir=tmp_path, progress=False)
    assert np.array_equal(first, second)


def test_aligned_crops_and_scorer_separate_people(
    small_split: dict[str, Path], scorer_model: Path, tmp_path: Path
) -> None:
    folder = list_images(small_split["test"])
    scorer = create_extractor("onnx", model_path=scorer_model, mean=0.0, std=1.0)
    digests = hash_files(folder, progress=False)
    crops, emb = aligned_faces(
        folder, digests, crop_size=64, scorer=scorer, cache_dir=tmp_path, progress=False
    )
    assert crops.shape == (len(folder), 64, 64, 3) and crops.dtype == np.uint8
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s = unit @ unit.T
    same = folder.identity[:, None] == folder.identity[None, :]
    off = ~np.eye(len(folder), dtype=bool)
    assert s[same & off].mean() > s[~same].mean() + 0.2
    # The crops are what the scorer expects: scoring them again gives the cached embeddings
    # up to the 112 -> 64 -> 112 resampling.
    again = scorer_embeddings(scorer, crops)
    again /= np.linalg.norm(again, axis=1, keepdims=True)
    assert np.mean(np.sum(again * unit, axis=1)) > 0.8
    cached, emb2 = aligned_faces(
        folder, digests, crop_size=64, scorer=scorer, cache_dir=tmp_path, progress=False
    )
    assert np.array_equal(cached, crops) and np.array_equal(emb, emb2)
