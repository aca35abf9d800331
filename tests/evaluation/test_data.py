"""Identity splits, generated pairs and the content-hash cache, on real LFW files."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np

from advplugin.evaluation.data import (
    FeatureCache,
    file_sha256,
    generate_pairs,
    limit_images,
    list_images,
    restrict_pairs,
    split_identities,
)
from advplugin.evaluation.metrics import read_pairs


def test_split_is_by_identity_deterministic_and_links_only(
    small_split: dict[str, Path], tmp_path: Path
) -> None:
    source = small_split["train"]
    first = split_identities(source, tmp_path / "a", test_fraction=0.5)
    split_identities(source, tmp_path / "b", test_fraction=0.5)
    a_train, a_test = list_images(tmp_path / "a/train"), list_images(tmp_path / "a/test")
    b_test = list_images(tmp_path / "b/test")
    assert not set(a_train.identity) & set(a_test.identity)
    assert list(a_test.path) == list(b_test.path)
    assert first["train_images"] + first["test_images"] == len(list_images(source))
    assert first["train_identities"] > 0 and first["test_identities"] > 0
    assert all(f.is_symlink() for f in a_train.files() + a_test.files())


def test_generated_pairs_follow_lfw_protocol(small_split: dict[str, Path], tmp_path: Path) -> None:
    folder = list_images(small_split["train"])
    protocol = generate_pairs(folder, per_fold=300, seed=1)
    ids = {str(p): str(i) for p, i in zip(folder.path, folder.identity, strict=True)}
    pairs = {tuple(sorted(p)) for p in zip(protocol.left, protocol.right, strict=True)}
    assert len(pairs) == len(protocol.left)  # no pair twice
    for left, right, same in zip(protocol.left, protocol.right, protocol.same, strict=True):
        assert left != right and (ids[left] == ids[right]) == same
    for f in range(protocol.n_folds):  # balanced folds over disjoint people
        in_fold = protocol.fold == f
        assert protocol.same[in_fold].sum() == (~protocol.same[in_fold]).sum()
        people = {
            ids[p]
            for p, k in zip(protocol.left + protocol.right, np.tile(in_fold, 2), strict=True)
            if k
        }
        others = {
            ids[p]
            for p, k in zip(protocol.left + protocol.right, np.tile(~in_fold, 2), strict=True)
            if k
        }
        assert not people & others


def test_restrict_pairs_keeps_pairs_inside_the_test_folder(face_data: Path) -> None:
    protocol = read_pairs(str(face_data / "lfw-dev-pairs.txt"))
    available = set(protocol.left[:50]) | set(protocol.right[:30])
    kept = restrict_pairs(protocol, available)
    assert 0 < len(kept.left) < len(protocol.left)
    assert all(
        a in available and b in available for a, b in zip(kept.left, kept.right, strict=True)
    )


def test_limit_images_keeps_people_with_pairs(small_split: dict[str, Path]) -> None:
    small = limit_images(list_images(small_split["train"]), max_identities=3, max_per_identity=2)
    names, counts = np.unique(small.identity, return_counts=True)
    assert len(names) == 3 and set(counts) == {2}


def test_cache_is_keyed_by_content_and_private(
    small_split: dict[str, Path], tmp_path: Path
) -> None:
    photo = list_images(small_split["test"]).files()[0]
    copy = tmp_path / "renamed.jpg"
    shutil.copyfile(photo, copy)
    assert file_sha256(copy) == file_sha256(photo)  # a renamed file hits the same entry
    cache = FeatureCache(tmp_path / "c/cache.npz", {"embedding": (4,), "detected": ()})
    cache.put(file_sha256(photo), {"embedding": np.arange(4.0), "detected": 1.0})
    cache.save()
    assert stat.S_IMODE(os.stat(tmp_path / "c/cache.npz").st_mode) == 0o600
    again = FeatureCache(tmp_path / "c/cache.npz", {"embedding": (4,), "detected": ()})
    assert file_sha256(copy) in again
    assert np.array_equal(again.get(file_sha256(copy))["embedding"], np.arange(4.0))
    with open(copy, "ab") as f:  # an edited image is a different entry
        f.write(b"\0")
    assert file_sha256(copy) not in again
    # A cache written with other fields (another harness version) is ignored, not misread.
    assert len(FeatureCache(tmp_path / "c/cache.npz", {"other": (2,)})) == 0
