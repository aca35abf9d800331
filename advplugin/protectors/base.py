"""The protector contract every scheme implements.

A protector turns raw embeddings into protected templates and scores protected templates
against each other. The raw embedding is an argument of `protect` and nothing else: a
protector keeps no reference to it, so that only templates outlive the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from advplugin.keys import Key
from advplugin.registry import Registry


@dataclass(frozen=True)
class ProtectorMetadata:
    """What a stored template must record so galleries can be migrated and keys rotated."""

    scheme: str
    scheme_version: int
    key_id: str | None
    input_dim: int
    output_dim: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def validate_embeddings(raw: object, dim: int, *, what: str = "embeddings") -> np.ndarray:
    """Check a batch of raw embeddings and return it as float32 [N, dim].

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
    norms = np.linalg.norm(raw, axis=1)
    if (norms < 1e-12).any():
        raise ValueError(f"{what} contain zero vectors ({int((norms < 1e-12).sum())} rows)")
    return np.ascontiguousarray(raw, dtype=np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


def cosine_score(probes: object, gallery: object, dim: int) -> np.ndarray:
    """Cosine similarity [P, G] of validated templates of dimension `dim`: what a FAISS
    inner-product index on normalised templates computes."""
    p = l2_normalize(validate_embeddings(probes, dim, what="probe templates"))
    g = l2_normalize(validate_embeddings(gallery, dim, what="gallery templates"))
    return p @ g.T


class Protector(ABC):
    """Base class: subclasses set `scheme`, `scheme_version`, declare their accuracy
    tolerance, and implement `_protect` on validated input."""

    scheme: ClassVar[str]
    scheme_version: ClassVar[int]
    #: Largest drop of 10-fold verification accuracy (fraction) the scheme may cost on LFW.
    accuracy_tolerance: ClassVar[float]
    #: False only for the `none` baseline, whose templates *are* the raw embeddings.
    protects: ClassVar[bool] = True
    #: True where templates from different keys must be unrelated.
    keyed: ClassVar[bool] = True

    def __init__(self, *, dim: int, key: Key | None) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if self.keyed and not isinstance(key, Key):
            raise ValueError(
                f"scheme {self.scheme!r} needs a key (create one with `advplugin keygen`)"
            )
        self.dim = dim
        # An unkeyed scheme ignores a key rather than recording a key id it does not use.
        self._key = key if self.keyed else None

    @property
    def output_dim(self) -> int:
        return self.dim

    @property
    def metadata(self) -> ProtectorMetadata:
        return ProtectorMetadata(
            scheme=self.scheme,
            scheme_version=self.scheme_version,
            key_id=self._key.key_id if self._key is not None else None,
            input_dim=self.dim,
            output_dim=self.output_dim,
        )

    def protect(self, raw: np.ndarray) -> np.ndarray:
        """Raw embeddings [N, dim] -> protected templates [N, output_dim] float32."""
        return self._protect(validate_embeddings(raw, self.dim))

    @abstractmethod
    def _protect(self, raw: np.ndarray) -> np.ndarray: ...

    def validate_templates(self, templates: object, *, what: str = "templates") -> np.ndarray:
        return validate_embeddings(templates, self.output_dim, what=what)

    def score(self, probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Similarity [P, G] between protected templates; higher means more alike.

        Cosine by default, which is what a FAISS inner-product index on normalised
        templates computes, so offline scores and gallery search agree.
        """
        return cosine_score(probes, gallery, self.output_dim)

    def __repr__(self) -> str:
        m = self.metadata
        return f"{type(self).__name__}(scheme={m.scheme}, v{m.scheme_version}, key_id={m.key_id}, dim={m.input_dim})"

    def __reduce__(self) -> object:
        # Pickling a protector would copy its secret key into whatever receives the
        # pickle (a worker, a cache file); refuse, and let workers load the key file.
        raise TypeError("protectors cannot be pickled: they hold a secret key")


SCHEMES: Registry[Protector] = Registry("protection scheme")
register_scheme = SCHEMES.register


def create_protector(
    name: str, /, *, key: Key | None = None, dim: int, **config: object
) -> Protector:
    """Build a registered protector by name, e.g. `create_protector("xnn", key=k, dim=128)`."""
    return SCHEMES.create(name, key=key, dim=dim, **config)


def list_schemes() -> list[str]:
    return SCHEMES.names()
