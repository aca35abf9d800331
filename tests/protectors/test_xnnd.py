"""What `xnn-d` promises beyond the contract suite (which runs on it too): the keyed
transform keeps the distilled matcher's scores, the matcher keeps held-out accuracy where
cosine on the noisy feature alone does not do better, the intermediate noisy feature is far
from the embedding, a key rotation works without raw embeddings, the runtime needs no torch,
missing dimensions or altered weights fail clearly, the latest release meets the issue's
utility goals on held-out people, and release 1 stays loadable for galleries enrolled with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advplugin.evaluation import attacks
from advplugin.evaluation.data import identity_in_test, restrict_pairs
from advplugin.evaluation.metrics import read_pairs, ten_fold_accuracy
from advplugin.evaluation.pairs_report import cosine_scores
from advplugin.keys import Key
from advplugin.protectors import create_protector, scheme_info
from advplugin.protectors.xnnd import LATEST_RELEASE, RELEASES, WEIGHTS, XNNDProtector

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(key: Key, **options: object) -> XNNDProtector:
    p = create_protector("xnn-d", key=key, dim=DIM, **options)
    assert isinstance(p, XNNDProtector)
    return p


@pytest.fixture(scope="module")
def heldout(lfw_cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The people on the evaluation's test side: never seen in training."""
    test = np.array([identity_in_test(str(i), 0.5) for i in lfw_cache["identity"]])
    return {k: lfw_cache[k][test] for k in ("embedding", "path", "identity")}


def test_keyed_transform_keeps_the_matcher_scores(key: Key, heldout) -> None:
    p = make(key)
    raw = heldout["embedding"][:400]
    e = p.matcher_embedding(raw)
    t = p.protect(raw)
    np.testing.assert_allclose(p.score(t, t), cosine_scores(e, e), atol=2e-5)
    # ...and the template is not the matcher's embedding itself, nor an `xnn` template.
    assert np.abs(np.sum(unit(e) * unit(t), axis=1)).max() < 0.5
    x = create_protector("xnn", key=key, dim=DIM).protect(raw)
    assert np.abs(np.sum(unit(x) * unit(t), axis=1)).max() < 0.5


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_heldout_accuracy_within_tolerance(
    key: Key, heldout, face_data: Path, release: int
) -> None:
    """On pairs of people the trainer never saw (the pairs file restricted to them)."""
    emb, paths = heldout["embedding"], heldout["path"]
    protocol = restrict_pairs(read_pairs(str(face_data / "lfw-dev-pairs.txt")), set(map(str, paths)))
    index = {str(q): i for i, q in enumerate(paths)}
    left = np.array([index[q] for q in protocol.left])
    right = np.array([index[q] for q in protocol.right])
    assert len(left) > 1000

    def accuracy(t: np.ndarray, score) -> float:
        s = np.array([score(t[a][None], t[b][None])[0, 0] for a, b in zip(left, right, strict=True)])
        return ten_fold_accuracy(s, protocol.same, protocol.fold)[0]

    p = make(key, release=release)
    raw = accuracy(emb, cosine_scores)
    assert raw > 0.95
    assert accuracy(p.protect(emb), p.score) >= raw - p.accuracy_tolerance


def test_latest_release_meets_the_utility_goals(key: Key, heldout, face_data: Path) -> None:
    """The issue's goals against raw, on held-out people: 10-fold accuracy within 0.5 pp,
    TAR at FAR 1e-3 within 1.5 pp, rank-1 with distractors within 1 pp (release 1 missed the
    last two: its MLP matcher generalised to new people worse than dlib)."""
    emb, paths, ident = heldout["embedding"], heldout["path"], heldout["identity"]
    protocol = restrict_pairs(read_pairs(str(face_data / "lfw-dev-pairs.txt")), set(map(str, paths)))

    def utility(score, templates: np.ndarray) -> dict[str, object]:
        rng = np.random.default_rng(0)
        return attacks.utility(
            score, templates, ident, paths, protocol, max_impostors=300_000, rng=rng
        )

    raw = utility(cosine_scores, emb)
    p = make(key)
    ours = utility(p.score, p.protect(emb))
    assert ours["verification_accuracy"] >= raw["verification_accuracy"] - 0.005
    assert ours["tar_at_far_1e-3"] >= raw["tar_at_far_1e-3"] - 0.015
    assert ours["rank1"] >= raw["rank1"] - 0.01


def test_release_1_stays_loadable_under_its_own_digest(key: Key, heldout) -> None:
    """Rows enrolled with release 1 carry its config digest: `release=1` reproduces that
    digest (the one its weights file gives) and its templates; the releases never mix."""
    old, new = make(key, release=1), make(key)
    assert new.config.release == LATEST_RELEASE > 1
    by_file = make(key, weights=str(RELEASES[1][DIM].path))
    assert old.metadata.config_digest == by_file.metadata.config_digest
    assert old.metadata.config_digest != new.metadata.config_digest
    assert scheme_info("xnn-d").config_digest(DIM, release=1) == old.metadata.config_digest
    raw = heldout["embedding"][:50]
    np.testing.assert_allclose(old.protect(raw), by_file.protect(raw), atol=1e-6)
    assert old.rotation_to(new) is None
    with pytest.raises(ValueError, match="no release 7"):
        create_protector("xnn-d", key=key, dim=DIM, release=7)


def test_noise_is_not_small(key: Key, heldout) -> None:
    """The generator moves the feature far from the embedding (S, not raw cosine, matches)."""
    p = make(key)
    u = unit(heldout["embedding"][:500])
    f = p.nets.noisy(u)
    assert np.mean(np.sum(u * unit(f), axis=1)) < 0.9


def test_deterministic_per_row(key: Key, heldout) -> None:
    p = make(key)
    raw = heldout["embedding"][:40]
    batch = p.protect(raw)
    singles = np.concatenate([p.protect(v) for v in raw])
    np.testing.assert_allclose(singles, batch, atol=1e-6)


def test_rotation_rekeys_without_raw_and_old_templates_become_useless(heldout) -> None:
    old, new = make(Key.generate()), make(Key.generate())
    raw = heldout["embedding"][:300]
    t_old, t_new = old.protect(raw), new.protect(raw)
    rotation = old.rotation_to(new)
    assert rotation is not None
    np.testing.assert_allclose(rotation.apply(t_old), t_new, atol=1e-4)
    # Without the rotation, the old templates do not match the new gallery.
    cross = cosine_scores(t_old, t_new)
    assert np.diag(cross).mean() < 0.1 + cross[~np.eye(len(raw), dtype=bool)].mean()
    # Another scheme, or other weights, cannot be reached by rotation.
    assert old.rotation_to(create_protector("xnn", key=Key.generate(), dim=DIM)) is None


def test_other_weights_change_the_digest_and_refuse_rotation(
    key: Key, tmp_path: Path
) -> None:
    path = tmp_path / "copy.npz"
    path.write_bytes(WEIGHTS[DIM].path.read_bytes() + b"")
    same = make(key, weights=str(path))
    assert same.metadata.config_digest == make(key).metadata.config_digest  # same content
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["s0_b"] = arrays["s0_b"] + 0.01
    other_path = tmp_path / "other.npz"
    np.savez(other_path, **arrays)
    other = make(key, weights=str(other_path))
    assert other.metadata.config_digest != same.metadata.config_digest
    assert make(key).rotation_to(other) is None


def test_dimension_without_weights_fails_clearly(key: Key) -> None:
    with pytest.raises(ValueError, match=r"no trained weights for dimension 512.*128"):
        create_protector("xnn-d", key=key, dim=512)
    assert scheme_info("xnn-d").dims == (128,)


def test_weights_of_another_dimension_are_refused(key: Key, tmp_path: Path) -> None:
    with np.load(WEIGHTS[DIM].path) as d:
        arrays = {k: d[k] for k in d.files}
    path = tmp_path / "w.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="not for dimension 64"):
        create_protector("xnn-d", key=key, dim=64, weights=str(path))


def test_altered_shipped_weights_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from advplugin.protectors import xnnd

    bad = {DIM: xnnd.WeightsFile(WEIGHTS[DIM].filename, "0" * 64)}
    monkeypatch.setattr(xnnd.XNNDProtector, "weights", bad)
    with pytest.raises(ValueError, match="SHA-256"):
        xnnd.XNNDProtector.weights_path(DIM)


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from advplugin.keys import Key\n"
        "from advplugin.protectors import create_protector\n"
        "p = create_protector('xnn-d', key=Key.generate(), dim=128)\n"
        "t = p.protect(np.random.default_rng(0).normal(size=(4, 128)).astype(np.float32))\n"
        "p.score(t, t)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
