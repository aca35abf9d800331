"""What `xnn` promises beyond the contract: exact cosine with an orthogonal matrix,
approximate with a Gaussian one, determinism across processes, and key rotation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from advplugin.evaluation.pairs_report import cosine_scores
from advplugin.keys import Key
from advplugin.protectors import create_protector


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(200, 512)).astype(np.float32)


def test_orthogonal_keeps_cosine_scores(key: Key, raw: np.ndarray) -> None:
    p = create_protector("xnn", key=key, dim=512)
    np.testing.assert_allclose(
        p.score(p.protect(raw), p.protect(raw)), cosine_scores(raw, raw), atol=2e-5
    )


def test_gaussian_keeps_cosine_approximately(key: Key, raw: np.ndarray) -> None:
    p = create_protector("xnn", key=key, dim=512, matrix="gaussian")
    t = p.protect(raw)
    err = np.abs(p.score(t, t) - cosine_scores(raw, raw))
    assert err.mean() < 0.05  # random projection: error ~ 1/sqrt(dim)
    assert err.max() > 1e-4  # and it is genuinely not exact


def test_same_key_same_transform_in_another_process(key: Key, tmp_path) -> None:
    """Templates must be reproducible wherever the key is loaded (a gallery outlives processes)."""
    from advplugin.keys import write_key

    write_key(tmp_path / "k", key)
    x = np.random.default_rng(3).normal(size=(4, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np; from advplugin.keys import load_key; from advplugin.protectors import create_protector;"
        f"p=create_protector('xnn', key=load_key(r'{tmp_path / 'k'}'), dim=128);"
        f"np.save(r'{tmp_path / 't.npy'}', p.protect(np.load(r'{tmp_path / 'x.npy'}')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(
        np.load(tmp_path / "t.npy"), create_protector("xnn", key=key, dim=128).protect(x)
    )


@pytest.mark.parametrize("matrix", ["orthogonal", "gaussian"])
def test_rotation_reprotects_without_raw(raw: np.ndarray, matrix: str) -> None:
    old = create_protector("xnn", key=Key.generate(), dim=512, matrix=matrix)
    new = create_protector("xnn", key=Key.generate(), dim=512, matrix=matrix)
    rotation = old.rotation_to(new)
    assert rotation is not None
    rotated = rotation.apply(old.protect(raw))
    np.testing.assert_allclose(rotated, new.protect(raw), atol=1e-4)
    assert rotation.from_key_id == old.metadata.key_id and rotation.to_key_id == new.metadata.key_id
    # After rotation, probes protected with the old key no longer match.
    assert np.abs(np.diag(old.score(old.protect(raw), rotated))).mean() < 0.2


def test_rotation_declines_other_schemes_and_mismatches(key: Key) -> None:
    xnn = create_protector("xnn", key=key, dim=128)
    assert create_protector("none", dim=128).rotation_to(xnn) is None
    assert xnn.rotation_to(create_protector("none", dim=128)) is None
    assert xnn.rotation_to(create_protector("xnn", key=Key.generate(), dim=512)) is None
    gaussian = create_protector("xnn", key=Key.generate(), dim=128, matrix="gaussian")
    assert xnn.rotation_to(gaussian) is None
