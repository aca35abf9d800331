"""The protector contract every scheme implements.

A protector turns raw embeddings into protected templates and scores protected templates
against each other. The raw embedding is an argument of `protect` and nothing else: a
protector keeps no reference to it, so that only templates outlive the call.
"""

from __future__ import annotations

import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from advplugin.keys import Key
from advplugin.protectors.calibration import Calibration, extractor_calibration
from advplugin.registry import Registry

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: Similarity [P, G] of protected probes against protected gallery templates.
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ProtectorMetadata:
    """What a stored template must record so galleries can be migrated and keys rotated.

    `config_digest` identifies everything besides the key that changes a template: the
    scheme's options (an orthogonal and a Gaussian `xnn` are different spaces) and the digest
    of its weights file, if any. It is written on every template row, so two configurations
    of one scheme never mix in a gallery silently."""

    scheme: str
    scheme_version: int
    key_id: str | None
    input_dim: int
    output_dim: int
    config_digest: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def config_digest(
    scheme: str, version: int, config: Mapping[str, object], weights_sha256: str | None
) -> str:
    """16 hex digits over the canonical JSON of what makes a scheme's templates what they are
    (never the key: a key is identified by its own key id)."""
    blob = json.dumps(
        {"scheme": scheme, "version": version, "config": dict(config), "weights": weights_sha256},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class WeightsFile:
    """A trained weights file a scheme ships (in `advplugin/protectors/weights/`), with the
    SHA-256 it must have: a changed file changes templates, so it is refused, not used."""

    filename: str
    sha256: str

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.filename

    def verified_path(self) -> Path:
        if not self.path.is_file():
            raise ValueError(f"weights file {self.path} not found")
        actual = file_sha256(self.path)
        if actual != self.sha256:
            raise ValueError(
                f"weights file {self.path.name} has SHA-256 {actual[:16]}..., the registry "
                f"expects {self.sha256[:16]}...; reinstall advplugin or register the new file"
            )
        return self.path


@dataclass(frozen=True)
class NoConfig:
    """Options of a scheme that has none."""


#: The largest L2 norm of an embedding or template any check accepts. Every keyed scheme
#: outputs unit vectors (xnn, advface, xnn-d: 1 +- 1e-7, `tests/protectors/test_contract.py`);
#: the unkeyed `none` baseline outputs the extractor's raw embedding (dlib: 1.27-1.65 on
#: LFW; unnormalised ArcFace-style ONNX embeddings: tens). 1e4 leaves orders of magnitude
#: over all of them, yet refuses what can never match: a template of 128 values of 1e38 is
#: finite but its squared norm overflows float32, normalises to a zero vector and scored 0
#: against everything while it sat in the gallery.
MAX_NORM = 1e4


def validate_embeddings(raw: object, dim: int, *, what: str = "embeddings") -> np.ndarray:
    """Check a batch of raw embeddings and return it as float32 [N, dim]: finite, non-zero,
    and of L2 norm at most `MAX_NORM` (magnitude, not only finiteness: see `MAX_NORM`).

    Errors name the problem but never echo values: the input is biometric data.
    """
    if not isinstance(raw, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(raw).__name__}")
    if raw.dtype.kind != "f" or raw.dtype.itemsize not in (4, 8):
        raise ValueError(f"{what} must be float32 or float64, got dtype {raw.dtype}")
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.ndim != 2:
        raise ValueError(f"{what} must have shape [N, {dim}], got {raw.ndim} dimensions")
    if raw.shape[1] != dim:
        raise ValueError(f"{what} must have dimension {dim}, got {raw.shape[1]}")
    if not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw).all(axis=1)).sum())
        raise ValueError(f"{what} contain NaN or infinite values ({bad} of {len(raw)} rows)")
    with np.errstate(over="ignore"):  # an overflowing square is refused below, not warned about
        norms = np.linalg.norm(raw, axis=1)
    if (norms < 1e-12).any():
        raise ValueError(f"{what} contain zero vectors ({int((norms < 1e-12).sum())} rows)")
    if (norms > MAX_NORM).any():
        raise ValueError(
            f"{what} contain vectors of L2 norm above {MAX_NORM:g} ({int((norms > MAX_NORM).sum())} "
            f"of {len(raw)} rows): not an embedding or protected template"
        )
    return np.ascontiguousarray(raw, dtype=np.float32)


def l2_normalize(x: np.ndarray, dtype: type[np.floating] | None = None) -> np.ndarray:
    """Rows of `x` [N, d] scaled to unit length. By default computed in `x`'s own dtype and
    returned as float32 (the templates' dtype); with `dtype` (np.float64 for training and
    evaluation), `x` is cast to it first and the result stays in it."""
    if dtype is not None:
        x = np.asarray(x, dtype)
    # einsum rather than np.linalg.norm: the same sums, a third of the per-call overhead,
    # which matters on the per-request path (one probe row before every index search).
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return (x / norms).astype(dtype or np.float32, copy=False)


@dataclass(frozen=True)
class CosineScorer:
    """Cosine of validated templates of dimension `dim`. `matches_index` tells the matcher
    that this score IS what an inner-product index on normalised templates computes, so
    the index's own scores can be used without reading vectors back to re-score them. A
    scheme with its own scorer returns another callable, which lacks the flag and is
    always re-scored."""

    dim: int
    matches_index: ClassVar[bool] = True

    def __call__(self, probes: object, gallery: object) -> np.ndarray:
        return cosine_score(probes, gallery, self.dim)


def cosine_score(probes: object, gallery: object, dim: int) -> np.ndarray:
    """Cosine similarity [P, G] of validated templates of dimension `dim`: what a FAISS
    inner-product index on normalised templates computes."""
    p = l2_normalize(validate_embeddings(probes, dim, what="probe templates"))
    g = l2_normalize(validate_embeddings(gallery, dim, what="gallery templates"))
    return p @ g.T


@dataclass(frozen=True)
class KeyRotation:
    """A linear map taking templates under one key to templates under another, without raw
    embeddings (what a scheme that can be re-keyed returns from `rotation_to`)."""

    matrix: np.ndarray
    from_key_id: str
    to_key_id: str

    def apply(self, templates: np.ndarray) -> np.ndarray:
        t = np.asarray(templates, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != self.matrix.shape[1]:
            raise ValueError(f"templates must have shape [N, {self.matrix.shape[1]}]")
        return l2_normalize((t @ self.matrix.T).astype(np.float32))


class Protector(ABC):
    """Base class: subclasses set `scheme`, `scheme_version`, declare their accuracy
    tolerance, their options (`config_class`) and weights, and implement `_protect` on
    validated input. Register a subclass with `@register_scheme`."""

    scheme: ClassVar[str]
    scheme_version: ClassVar[int]
    #: Largest drop of 10-fold verification accuracy (fraction) the scheme may cost on LFW.
    accuracy_tolerance: ClassVar[float]
    #: False only for the `none` baseline, whose templates *are* the raw embeddings.
    protects: ClassVar[bool] = True
    #: True where templates from different keys must be unrelated.
    keyed: ClassVar[bool] = True
    #: The scheme's options: a frozen dataclass, built from `create_protector`'s keywords.
    config_class: ClassVar[type] = NoConfig
    #: Trained weights per input dimension. Empty: the scheme works at any dimension.
    weights: ClassVar[Mapping[int, WeightsFile]] = {}
    #: True where the scorer's score of two templates IS the cosine of the two raw embeddings
    #: (the identity; an orthogonal map of unit vectors): the extractor's own calibrated
    #: thresholds then hold unchanged. Options may undo it (`scores_preserved`).
    preserves_scores: ClassVar[bool] = False
    #: Decision thresholds measured for the scheme's own scores where it moves them (trained
    #: noise), per extractor name (`advplugin.adapters`' names) and weights version
    #: (`calibration_version`); `advplugin.protectors.calibration` says how they were measured.
    calibrations: ClassVar[Mapping[str, Mapping[int, Calibration]]] = {}

    def __init__(self, *, dim: int, key: Key | None, config: Any = None) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if self.keyed and not isinstance(key, Key):
            raise ValueError(
                f"scheme {self.scheme!r} needs a key (create one with `advplugin keygen`)"
            )
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ValueError(f"{self.scheme} config must be a {self.config_class.__name__}")
        self.dim = dim
        # An unkeyed scheme ignores a key rather than recording a key id it does not use.
        self._key = key if self.keyed else None

    # -- what a caller can know without a key (SchemeInfo reads these) -------------------------
    @classmethod
    def make_config(cls, **options: object) -> Any:
        try:
            return cls.config_class(**options)
        except TypeError as e:
            raise ValueError(f"bad {cls.scheme} option: {e}") from None

    @classmethod
    def digest_options(cls, config: Any) -> dict[str, object]:
        """The options that change templates (a scheme drops e.g. a weights *path*, whose
        content is identified by `weights_sha256` instead)."""
        return asdict(config)

    @classmethod
    def weights_sha256(cls, dim: int, config: Any) -> str | None:
        w = cls.weights.get(dim)
        return w.sha256 if w is not None else None

    @classmethod
    def output_dim_for(cls, dim: int, config: Any) -> int:
        return dim

    @classmethod
    def scores_preserved(cls, config: Any) -> bool:
        """`preserves_scores` for templates made with `config`."""
        return cls.preserves_scores

    @classmethod
    def calibration_version(cls, config: Any) -> int | None:
        """The entry of `calibrations` (per extractor) that `config`'s scores were measured
        as, or None where no measurement applies to them."""
        return None

    @classmethod
    def calibration(cls, extractor: str, config: Any) -> Calibration | None:
        """Decision thresholds for templates made with `config` from `extractor`'s
        embeddings, in the units of `scorer`: the extractor's raw calibration where scores are
        preserved, the scheme's own where it ships one, else None."""
        if cls.scores_preserved(config):
            return extractor_calibration(extractor)
        version = cls.calibration_version(config)
        if version is None:
            return None
        return cls.calibrations.get(extractor, {}).get(version)

    @classmethod
    def scorer(cls, dim: int, config: Any) -> ScoreFn:
        """The scheme's similarity of protected templates at input dimension `dim`, built
        without a key: a service that holds no key (template mode) matches with it too.

        Cosine by default, which is what a FAISS inner-product index on normalised
        templates computes, so offline scores and gallery search agree.
        """
        return CosineScorer(cls.output_dim_for(dim, config))

    # -- an instance -----------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.output_dim_for(self.dim, self.config)

    @property
    def metadata(self) -> ProtectorMetadata:
        return ProtectorMetadata(
            scheme=self.scheme,
            scheme_version=self.scheme_version,
            key_id=self._key.key_id if self._key is not None else None,
            input_dim=self.dim,
            output_dim=self.output_dim,
            config_digest=self._config_digest,
        )

    @classmethod
    def digest_for(cls, dim: int, config: Any) -> str:
        """The config digest of templates this scheme makes at `dim` with `config`."""
        return config_digest(
            cls.scheme, cls.scheme_version, cls.digest_options(config), cls.weights_sha256(dim, config)
        )

    @cached_property
    def _config_digest(self) -> str:
        return self.digest_for(self.dim, self.config)

    def protect(self, raw: np.ndarray) -> np.ndarray:
        """Raw embeddings [N, dim] -> protected templates [N, output_dim] float32."""
        return self._protect(validate_embeddings(raw, self.dim))

    @abstractmethod
    def _protect(self, raw: np.ndarray) -> np.ndarray: ...

    @cached_property
    def score_fn(self) -> ScoreFn:
        """The scheme's scorer at this protector's dimension (what `score` calls): the
        object a matcher is given, so it can tell a plain cosine (`CosineScorer`) apart."""
        return self.scorer(self.dim, self.config)

    def score(self, probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Similarity [P, G] between protected templates; higher means more alike."""
        return self.score_fn(probes, gallery)

    def rotation_to(self, other: Protector) -> KeyRotation | None:
        """The map re-keying this protector's templates to `other`'s without raw embeddings,
        or None where that is impossible (the scheme cannot, or `other` differs in scheme,
        options or dimension). A capability a scheme declares by overriding this."""
        return None

    def __repr__(self) -> str:
        m = self.metadata
        return f"{type(self).__name__}(scheme={m.scheme}, v{m.scheme_version}, key_id={m.key_id}, dim={m.input_dim})"

    def __reduce__(self) -> object:
        # Pickling a protector would copy its secret key into whatever receives the
        # pickle (a worker, a cache file); refuse, and let workers load the key file.
        raise TypeError("protectors cannot be pickled: they hold a secret key")


class TrainedProtector(Protector):
    """A scheme with trained weights per input dimension (`weights`), which its config may
    replace by a file of its own (a `weights` option holding a path, e.g. weights trained on
    the deployment's embeddings). The path never enters the config digest; the file's
    SHA-256 does, so galleries made with two weights files never mix."""

    #: The command that trains weights, named in the error for a dimension without any.
    trainer: ClassVar[str]

    @classmethod
    def weights_path(cls, dim: int, override: str | None = None) -> Path:
        """The weights file to load: `override`, else the shipped file for `dim` (its
        SHA-256 verified)."""
        if override is not None:
            return Path(override)
        if dim not in cls.weights:
            have = ", ".join(f"{d} ({w.filename})" for d, w in cls.weights.items())
            raise ValueError(
                f"{cls.scheme} has no trained weights for dimension {dim}; weights exist for: "
                f"{have}. Train them with `{cls.trainer}`"
            )
        return cls.weights[dim].verified_path()

    #: Schemes that ship several trained versions: the config option naming the version
    #: (e.g. "release"), and each version's files; `weights` is the default version's.
    version_option: ClassVar[str | None] = None
    versions: ClassVar[Mapping[int, Mapping[int, Any]]] = {}

    @classmethod
    def _version(cls, config: Any) -> int | None:
        """The non-default version `config` asks for (None: the default, or a given file)."""
        if cls.version_option is None or getattr(config, "weights", None) is not None:
            return None
        version = getattr(config, cls.version_option)
        return None if cls.versions.get(version) is cls.weights else version

    @classmethod
    def weights_path_for(cls, dim: int, config: Any) -> Path:
        """`weights_path` for the default version or a given file; another version's shipped
        file otherwise (SHA-256 verified the same way)."""
        version = cls._version(config)
        if version is None:
            return cls.weights_path(dim, getattr(config, "weights", None))
        files = cls.versions[version]
        if dim not in files:
            raise ValueError(f"{cls.scheme} {cls.version_option} {version} has no weights for dimension {dim}")
        return files[dim].verified_path()

    @classmethod
    def digest_options(cls, config: Any) -> dict[str, object]:
        """Neither the path nor the version number: the weights' SHA-256 identifies both, so
        the first version's templates keep the config digest they were stored with."""
        drop = {"weights", cls.version_option}
        return {k: v for k, v in super().digest_options(config).items() if k not in drop}

    @classmethod
    def calibration_version(cls, config: Any) -> int | None:
        """The shipped version `config` loads (`version_option`'s value; 1 for a scheme with
        a single version), or None for a weights file of the user's own: its scores were never
        measured."""
        if getattr(config, "weights", None) is not None:
            return None
        return 1 if cls.version_option is None else int(getattr(config, cls.version_option))

    @classmethod
    def weights_sha256(cls, dim: int, config: Any) -> str | None:
        if getattr(config, "weights", None) is not None:
            return file_sha256(Path(config.weights))
        version = cls._version(config)
        if version is not None:
            w = cls.versions[version].get(dim)
            return w.sha256 if w is not None else None
        return super().weights_sha256(dim, config)


@dataclass(frozen=True)
class SchemeInfo:
    """A registered scheme's metadata, read without a key or weights being loaded: like
    timm's pretrained configs, what a service needs to check a gallery before it builds
    anything (version, keyed or not, dimensions, weights and their digests)."""

    name: str
    protector: type[Protector] = field(repr=False)

    @property
    def version(self) -> int:
        return self.protector.scheme_version

    @property
    def keyed(self) -> bool:
        return self.protector.keyed

    @property
    def protects(self) -> bool:
        return self.protector.protects

    @property
    def weights(self) -> Mapping[int, WeightsFile]:
        return self.protector.weights

    @property
    def dims(self) -> tuple[int, ...] | None:
        """Input dimensions with trained weights; None: any dimension."""
        return tuple(sorted(self.weights)) if self.weights else None

    @property
    def description(self) -> str:
        doc = self.protector.__doc__ or sys.modules[self.protector.__module__].__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def supports(self, dim: int) -> bool:
        return self.dims is None or dim in self.dims

    def config_digest(self, dim: int, **options: object) -> str:
        return self.protector.digest_for(dim, self.protector.make_config(**options))

    def output_dim(self, dim: int, **options: object) -> int:
        return self.protector.output_dim_for(dim, self.protector.make_config(**options))

    def scorer(self, dim: int, **options: object) -> ScoreFn:
        return self.protector.scorer(dim, self.protector.make_config(**options))

    def calibration(self, extractor: str, **options: object) -> Calibration | None:
        """Decision thresholds (score at FMR 1e-2 ... 1e-5, in `scorer`'s units) measured
        for templates of `extractor`'s embeddings with `options`, or None where none was
        (`advplugin.protectors.calibration`)."""
        return self.protector.calibration(extractor, self.protector.make_config(**options))


SCHEMES: Registry[Protector] = Registry("protection scheme")


def register_scheme(cls: type[Protector]) -> type[Protector]:
    """Class decorator: registers a protector under its `scheme` name, with its metadata."""

    def create(*, dim: int, key: Key | None = None, **options: object) -> Protector:
        return cls(dim=dim, key=key, config=cls.make_config(**options))

    create.__module__, create.__doc__ = cls.__module__, cls.__doc__
    SCHEMES.add(cls.scheme, create, info=SchemeInfo(cls.scheme, cls))
    return cls


def create_protector(
    name: str, /, *, key: Key | None = None, dim: int, **config: object
) -> Protector:
    """Build a registered protector by name, e.g. `create_protector("xnn", key=k, dim=128)`."""
    return SCHEMES.create(name, key=key, dim=dim, **config)


def scheme_info(name: str) -> SchemeInfo:
    """A scheme's metadata without building it; unknown names fail listing the valid ones."""
    info = SCHEMES.info(name)
    assert isinstance(info, SchemeInfo)
    return info


def list_schemes() -> list[str]:
    return SCHEMES.names()
