"""What `advface` promises beyond the contract suite (which runs on it too): the drift budget
holds for any input, the noise is a deterministic function of the embedding, the keyed
transform keeps scores, the noise disrupts the shadow decoder more than random noise of the
same size on people it never saw, and dimensions without weights fail clearly. Every shipped
version keeps these promises; version 1 keeps the templates and config digest it had before
version 2 existed, so galleries enrolled with it still match."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.evaluation.data import identity_in_test
from advplugin.evaluation.pairs_report import cosine_scores
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.advface import VERSIONS, AdvFaceProtector, load_weights
from advplugin.protectors.base import config_digest
from advplugin.protectors.xnn import XNNProtector

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def heldout(lfw_cache: dict[str, np.ndarray]) -> np.ndarray:
    """Raw embeddings of people on the evaluation's test side: never seen in training."""
    test = np.array([identity_in_test(str(i), 0.5) for i in lfw_cache["identity"]])
    return lfw_cache["embedding"][test][:600]


def noise_only(key: Key, version: int | None = None) -> AdvFaceProtector:
    options = {} if version is None else {"version": version}
    p = create_protector("advface", key=key, dim=DIM, transform="none", **options)
    assert isinstance(p, AdvFaceProtector)
    return p


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_drift_stays_within_budget_for_any_input(key: Key, version: int) -> None:
    p = noise_only(key, version)
    rng = np.random.default_rng(3)
    # Far outside the training distribution too: the bound is by construction.
    raw = np.concatenate([rng.normal(size=(300, DIM)), rng.normal(size=(300, DIM)) * 50 + 3])
    cos = np.sum(unit(raw) * unit(p.protect(raw.astype(np.float32))), axis=1)
    assert cos.min() >= p.min_cosine - 1e-5
    assert cos.max() < 0.9999  # noise was added


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_noise_on_real_faces_uses_the_budget(key: Key, heldout: np.ndarray, version: int) -> None:
    p = noise_only(key, version)
    cos = np.sum(unit(heldout) * unit(p.protect(heldout)), axis=1)
    assert cos.min() >= p.min_cosine - 1e-5
    assert cos.mean() < 0.99  # the templates really moved away from the embeddings


def test_noise_is_deterministic_and_per_row(key: Key, heldout: np.ndarray) -> None:
    p = noise_only(key)
    batch = p.protect(heldout[:50])
    again = create_protector("advface", key=Key.generate(), dim=DIM, transform="none")
    np.testing.assert_array_equal(batch, again.protect(heldout[:50]))  # noise needs no key
    singles = np.concatenate([p.protect(v) for v in heldout[:50]])
    np.testing.assert_allclose(singles, batch, atol=1e-6)  # a row never depends on its batch


def test_keyed_transform_keeps_the_noisy_scores(key: Key, heldout: np.ndarray) -> None:
    keyed, plain = create_protector("advface", key=key, dim=DIM), noise_only(key)
    t_keyed, t_plain = keyed.protect(heldout), plain.protect(heldout)
    np.testing.assert_allclose(
        keyed.score(t_keyed, t_keyed), cosine_scores(t_plain, t_plain), atol=2e-5
    )
    # ...and lies in another space than an `xnn` gallery under the same key.
    xnn = create_protector("xnn", key=key, dim=DIM).protect(heldout)
    assert np.abs(np.sum(unit(xnn) * unit(t_keyed), axis=1)).max() < 0.5


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_nearest_neighbours_survive_the_noise(key: Key, heldout: np.ndarray, version: int) -> None:
    """Each held-out photo's best match barely changes when both sides carry the noise."""
    p = noise_only(key, version)
    raw_s = cosine_scores(heldout, heldout)
    prot_s = cosine_scores(p.protect(heldout), p.protect(heldout))
    np.fill_diagonal(raw_s, -2)
    np.fill_diagonal(prot_s, -2)
    raw_top, prot_top = raw_s.argmax(1), prot_s.argmax(1)
    agree = (raw_top == prot_top).mean()
    assert agree > 0.9


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_disrupts_the_shadow_decoder_more_than_random_noise(
    key: Key, heldout: np.ndarray, version: int
) -> None:
    torch = pytest.importorskip("torch")
    from advplugin.nets.advface import shadow_decoder
    from advplugin.training.advface_common import disruption, random_noise_at

    generator, state, record = load_weights(VERSIONS[version][DIM].verified_path())
    decoder = shadow_decoder(state, record)
    u = unit(heldout[:200])
    _, angle = generator.direction_and_angle(u)
    torch.manual_seed(0)
    adversarial = disruption(decoder, u, generator(u))
    random = disruption(decoder, u, random_noise_at(u, angle, np.random.default_rng(0)))
    assert adversarial > 1.5 * random


def test_refinement_increases_disruption_within_budget(key: Key, heldout: np.ndarray) -> None:
    pytest.importorskip("torch")
    from advplugin.nets.advface import shadow_decoder
    from advplugin.training.advface_common import disruption

    _, state, record = load_weights(AdvFaceProtector.weights_path(DIM))
    decoder = shadow_decoder(state, record)
    plain = create_protector("advface", key=key, dim=DIM, transform="none")
    refined = create_protector("advface", key=key, dim=DIM, transform="none", refine_steps=5)
    u = unit(heldout[:32])
    t0, t1 = plain.noisy(heldout[:32]), refined.noisy(heldout[:32])
    assert np.sum(u * t1, axis=1).min() >= plain.min_cosine - 1e-5
    assert disruption(decoder, u, t1) > disruption(decoder, u, t0)


def test_dimension_without_weights_is_a_clear_error(key: Key) -> None:
    with pytest.raises(ValueError, match=r"no trained weights for dimension 512.*128"):
        create_protector("advface", key=key, dim=512)


def test_bad_options(key: Key) -> None:
    with pytest.raises(ValueError, match="transform"):
        create_protector("advface", key=key, dim=DIM, transform="rot13")
    with pytest.raises(ValueError, match="option"):
        create_protector("advface", key=key, dim=DIM, colour="blue")
    with pytest.raises(ValueError, match="needs a key"):
        create_protector("advface", key=None, dim=DIM)


def test_weights_are_identified_by_content_and_a_changed_file_is_refused(key, tmp_path) -> None:
    from advplugin.protectors import scheme_info
    from advplugin.protectors.advface import WEIGHTS

    shipped = WEIGHTS[DIM]
    assert scheme_info("advface").weights[DIM] == shipped and scheme_info("advface").dims == (DIM,)
    copy = tmp_path / "copy.npz"
    copy.write_bytes(shipped.path.read_bytes())
    same = create_protector("advface", key=key, dim=DIM, weights=str(copy))
    assert same.metadata.config_digest == create_protector("advface", key=key, dim=DIM).metadata.config_digest
    # Other weights (here: the same file with one byte appended) are another configuration.
    copy.write_bytes(shipped.path.read_bytes() + b"\0")
    assert scheme_info("advface").config_digest(DIM, weights=str(copy)) != same.metadata.config_digest
    tampered = type(shipped)(shipped.filename, "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        tampered.verified_path()


def test_version_1_keeps_its_templates_and_digest(key: Key, heldout: np.ndarray) -> None:
    """Galleries enrolled before version 2 existed: the same config digest (computed here as
    the code of that time did: no `version` option, v1's weights SHA-256) and the same
    templates (v1's generator, then the xnn transform of the `advface/v1/xnn` sub-key)."""
    v1 = create_protector("advface", key=key, dim=DIM, version=1)
    assert isinstance(v1, AdvFaceProtector)
    before = config_digest(
        "advface", 1, {"transform": "xnn", "refine_steps": 0, "refine_lr": 0.005},
        VERSIONS[1][DIM].sha256,
    )  # fmt: skip
    assert v1.metadata.config_digest == before
    generator, _, _ = load_weights(VERSIONS[1][DIM].verified_path())
    sub = XNNProtector(dim=DIM, key=Key(key.derive("advface/v1/xnn", 32)))
    expected = sub.protect(generator(unit(heldout[:20])).astype(np.float32))
    np.testing.assert_allclose(v1.protect(heldout[:20]), expected, atol=1e-6)


@pytest.mark.skipif(len(VERSIONS) < 2, reason="only one advface version is shipped")
def test_versions_are_different_spaces_and_configurations(key: Key, heldout: np.ndarray) -> None:
    a, b = (create_protector("advface", key=key, dim=DIM, version=v) for v in sorted(VERSIONS)[:2])
    assert a.metadata.config_digest != b.metadata.config_digest
    # Same key, two versions: other noise and another sub-key, so the templates of one
    # person are unrelated across the two galleries.
    cross = np.sum(unit(a.protect(heldout)) * unit(b.protect(heldout)), axis=1)
    assert np.abs(cross).max() < 0.5


def test_unknown_version_is_a_clear_error(key: Key) -> None:
    with pytest.raises(ValueError, match=r"no version 99.*versions"):
        create_protector("advface", key=key, dim=DIM, version=99)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_every_version_keeps_accuracy_within_the_declared_tolerance(
    key: Key, face_data, lfw_cache: dict[str, np.ndarray], version: int
) -> None:
    """The contract suite checks the default version; the others make the same promise."""
    from advplugin.evaluation.pairs_report import verification_report

    pairs = str(face_data / "lfw-dev-pairs.txt")
    emb, paths, ident = lfw_cache["embedding"], lfw_cache["path"], lfw_cache["identity"]
    raw = verification_report(emb, paths, ident, pairs, cosine_scores)
    p = create_protector("advface", key=key, dim=DIM, version=version)
    protected = verification_report(p.protect(emb), paths, ident, pairs, p.score)
    assert protected["accuracy"] >= raw["accuracy"] - p.accuracy_tolerance
