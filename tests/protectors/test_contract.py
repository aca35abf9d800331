"""One contract every registered protection scheme must satisfy (timm style: parametrised
over the registry, so a newly registered scheme is tested without writing a new test)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from advplugin.evaluation.pairs_report import cosine_scores, verification_report
from advplugin.keys import Key
from advplugin.protectors import Protector, create_protector, list_schemes, scheme_info
from advplugin.protectors.base import MAX_NORM, validate_embeddings

DIM = 128
SCHEMES = list_schemes()


def make(scheme: str, key: Key | None, dim: int = DIM) -> Protector:
    return create_protector(scheme, key=key, dim=dim)


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """Embedding-like vectors: random directions with the norm range of dlib descriptors."""
    rng = np.random.default_rng(7)
    return (rng.normal(size=(64, DIM)) * 0.08).astype(np.float32)


def contains_vector(obj: object, vector: np.ndarray, seen: set[int] | None = None) -> bool:
    """True if any array reachable from `obj` holds `vector` (or its normalised form) as a row."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f" and obj.size >= vector.size:
        rows = (
            obj.reshape(-1, obj.shape[-1])
            if obj.shape[-1] == vector.size
            else obj.reshape(-1)[: vector.size][None]
        )
        unit = vector / np.linalg.norm(vector)
        norms = np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12
        return bool((np.abs(rows / norms - unit).max(axis=1) < 1e-5).any())
    if isinstance(obj, dict):
        return any(contains_vector(v, vector, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return any(contains_vector(v, vector, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return contains_vector(vars(obj), vector, seen)
    return False


@pytest.mark.parametrize("scheme", SCHEMES)
class TestContract:
    def test_metadata_readable_without_a_key(self, scheme: str, key: Key, raw: np.ndarray) -> None:
        """The registry entry tells version, keyed, dimensions, config digest and scorer
        without building a protector; what it tells is what a built protector does."""
        info = scheme_info(scheme)
        p = make(scheme, key)
        m = p.metadata
        assert (info.version, info.keyed, info.protects) == (m.scheme_version, p.keyed, p.protects)
        assert info.supports(DIM) and info.output_dim(DIM) == m.output_dim
        assert info.config_digest(DIM) == m.config_digest
        assert len(m.config_digest) == 16 and int(m.config_digest, 16) >= 0
        # The keyless scorer is the scheme's own: the same scores as the keyed protector's.
        t = p.protect(raw)
        np.testing.assert_allclose(info.scorer(DIM)(t[:8], t), p.score(t[:8], t), atol=1e-6)
        assert info.description  # `advplugin list` shows it

    def test_config_digest_ignores_the_key(self, scheme: str) -> None:
        a, b = make(scheme, Key.generate()), make(scheme, Key.generate())
        assert a.metadata.config_digest == b.metadata.config_digest

    def test_rotation_is_declared_and_correct_when_offered(self, scheme: str, raw: np.ndarray) -> None:
        old, new = make(scheme, Key.generate()), make(scheme, Key.generate())
        rotation = old.rotation_to(new)
        if rotation is None:
            return  # the scheme declares it cannot re-key without raw embeddings
        np.testing.assert_allclose(rotation.apply(old.protect(raw)), new.protect(raw), atol=1e-4)

    def test_shapes_and_dtype(self, scheme: str, key: Key, raw: np.ndarray) -> None:
        p = make(scheme, key)
        t = p.protect(raw)
        assert t.shape == (len(raw), p.output_dim)
        assert t.dtype == np.float32
        assert p.protect(raw[0]).shape == (1, p.output_dim)  # one vector is a batch of one
        assert p.protect(raw.astype(np.float64)).dtype == np.float32
        s = p.score(t[:5], t)
        assert s.shape == (5, len(raw))
        assert np.allclose(
            np.diag(s[:, :5]), s[:, :5].max(axis=1)
        )  # a template matches itself best

    def test_metadata(self, scheme: str, key: Key) -> None:
        p = make(scheme, key)
        m = p.metadata
        assert m.scheme == scheme and m.input_dim == DIM and m.output_dim == p.output_dim
        assert isinstance(m.scheme_version, int) and m.scheme_version >= 1
        assert m.key_id == (key.key_id if p.keyed else None)
        assert key.secret.hex() not in repr(p) + repr(m.as_dict())

    def test_same_key_same_template(self, scheme: str, key: Key, raw: np.ndarray) -> None:
        a = make(scheme, key).protect(raw)
        b = make(scheme, Key(key.secret)).protect(raw)
        np.testing.assert_array_equal(a, b)

    def test_different_keys_unrelated(self, scheme: str, raw: np.ndarray) -> None:
        p1, p2 = make(scheme, Key.generate()), make(scheme, Key.generate())
        t1, t2 = p1.protect(raw), p2.protect(raw)
        if not p1.keyed:  # an unkeyed baseline must at least ignore the key entirely
            np.testing.assert_array_equal(t1, t2)
            return
        cross = cosine_scores(t1, t2)
        mated, non_mated = np.diag(cross), cross[~np.eye(len(raw), dtype=bool)]
        # The same person's templates under two keys must look like two different people.
        assert abs(mated.mean() - non_mated.mean()) < 0.05
        assert np.abs(mated).max() < 0.5

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            (lambda r: np.where(np.arange(DIM) == 3, np.nan, r).astype(np.float32), "NaN"),
            (lambda r: np.where(np.arange(DIM) == 3, np.inf, r).astype(np.float32), "infinite"),
            (lambda r: np.zeros_like(r), "zero"),
            # finite but absurd: 1e38 is a float32, its square is not (the norm overflows)
            (lambda r: np.full_like(r, 1e38), "norm above"),
            (lambda r: r.astype(np.float64) * 1e6, "norm above"),
            (lambda r: r[:, :-1], "dimension"),
            (lambda r: (r * 1000).astype(np.int32), "dtype"),
            (lambda r: r.astype(np.float16), "dtype"),
            (lambda r: r[None], "shape"),
            (lambda r: r.tolist(), "numpy array"),
        ],
        ids=["nan", "inf", "zero", "1e38", "norm-1e5", "wrong-dim", "int", "float16", "3d", "list"],
    )
    def test_bad_input_is_a_clear_value_error(
        self, scheme: str, key: Key, raw: np.ndarray, bad, message: str
    ) -> None:
        p = make(scheme, key)
        with pytest.raises(ValueError, match=message):
            p.protect(bad(raw[:4]))

    def test_the_magnitude_bound_accepts_every_template_the_scheme_makes(
        self, scheme: str, key: Key, raw: np.ndarray
    ) -> None:
        """`MAX_NORM` is sound for the scheme: raw embeddings up to the bound (1,000 times
        the largest dlib norm and beyond) give templates that the same check accepts, so a
        client's templates are never refused for their magnitude; the ones past it are."""
        p = make(scheme, key)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        for norm in (1e-3, 1.0, 50.0, 0.999 * MAX_NORM):
            t = p.protect((unit * norm).astype(np.float32))
            assert np.linalg.norm(t, axis=1).max() <= MAX_NORM, norm
            np.testing.assert_array_equal(validate_embeddings(t, p.output_dim), t)
        with pytest.raises(ValueError, match="norm above"):
            p.protect((unit * 1.01 * MAX_NORM).astype(np.float32))

    def test_nothing_kept_or_returned_holds_the_raw_vector(
        self, scheme: str, key: Key, raw: np.ndarray
    ) -> None:
        p = make(scheme, key)
        t = p.protect(raw)
        p.score(t, t)
        for vector in raw[:8]:
            assert not contains_vector(p, vector), "the protector kept a raw vector"
            if p.protects:
                assert not contains_vector(t, vector), "a template equals the raw vector"
        if p.protects:
            unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
            assert np.abs(np.sum(unit * t, axis=1) / np.linalg.norm(t, axis=1)).max() < 0.5

    def test_refuses_pickling(self, scheme: str, key: Key) -> None:
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(make(scheme, key))

    def test_accuracy_within_declared_tolerance(
        self, scheme: str, key: Key, face_data, lfw_cache
    ) -> None:
        pairs = str(face_data / "lfw-dev-pairs.txt")
        emb, paths, ident = lfw_cache["embedding"], lfw_cache["path"], lfw_cache["identity"]
        raw_report = verification_report(emb, paths, ident, pairs, cosine_scores)
        p = make(scheme, key)
        prot_report = verification_report(p.protect(emb), paths, ident, pairs, p.score)
        assert raw_report["accuracy"] > 0.95  # the extractor itself is sound
        assert prot_report["accuracy"] >= raw_report["accuracy"] - p.accuracy_tolerance


def test_unknown_scheme_lists_available() -> None:
    with pytest.raises(ValueError, match=r"available: .*xnn"):
        create_protector("xnm", key=Key.generate(), dim=DIM)


def test_keyed_scheme_needs_a_key() -> None:
    with pytest.raises(ValueError, match="needs a key"):
        create_protector("xnn", key=None, dim=DIM)


def test_bad_dim_and_option() -> None:
    with pytest.raises(ValueError, match="dim"):
        create_protector("xnn", key=Key.generate(), dim=0)
    with pytest.raises(ValueError, match="option"):
        create_protector("xnn", key=Key.generate(), dim=DIM, colour="blue")


def test_unknown_scheme_metadata_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"available: .*xnn"):
        scheme_info("xnm")


def test_two_configurations_of_one_scheme_have_different_digests(key: Key) -> None:
    orthogonal = make("xnn", key).metadata
    gaussian = create_protector("xnn", key=key, dim=DIM, matrix="gaussian").metadata
    assert orthogonal.config_digest != gaussian.config_digest
    assert scheme_info("xnn").config_digest(DIM, matrix="gaussian") == gaussian.config_digest
