"""`xnn`: keyed permutation + secret random matrix (XNN, Liu et al. 2024), on the embedding.

template = M · P · x / ||x||, with the permutation P and matrix M derived from the secret key
and the embedding dimension. With an orthogonal M (the default) inner products of unit
vectors are preserved, so cosine scores - and therefore accuracy - are exactly those of raw
embeddings. A Gaussian M keeps them approximately (random projection), is not norm
preserving, and is offered for experiments with the paper's original construction.

Different keys give unrelated transforms, so templates are unlinkable across deployments.
Because the transform is invertible, a key rotation K1 -> K2 is the matrix T2 · T1^-1 and
re-protects stored templates without any raw embedding. The flip side, stated honestly:
an attacker holding the key (or about `dim` known raw/template pairs, see the evaluation's
key-recovery figure) can invert the transform; renewability is the answer to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from advplugin.keys import Key
from advplugin.protectors.base import KeyRotation, Protector, l2_normalize, register_scheme

MatrixKind = Literal["orthogonal", "gaussian"]


@dataclass(frozen=True)
class XNNConfig:
    matrix: MatrixKind = "orthogonal"

    def __post_init__(self) -> None:
        if self.matrix not in ("orthogonal", "gaussian"):
            raise ValueError(f"xnn matrix must be 'orthogonal' or 'gaussian', got {self.matrix!r}")


def _uniforms(stream: bytes) -> np.ndarray:
    """Uniform floats in (0, 1) from 8-byte words of a key-derived stream (53-bit mantissa)."""
    words = np.frombuffer(stream, dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _permutation(key: Key, label: str, n: int) -> np.ndarray:
    """Fisher-Yates shuffle driven by the key stream (platform independent)."""
    words = np.frombuffer(key.derive(label, 8 * n), dtype="<u8")
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(words[i] % np.uint64(i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _gaussian(key: Key, label: str, shape: tuple[int, int]) -> np.ndarray:
    """Standard normals by Box-Muller over the key stream."""
    n = shape[0] * shape[1]
    u = _uniforms(key.derive(label, 16 * ((n + 1) // 2)))
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return z[:n].reshape(shape)


@register_scheme
class XNNProtector(Protector):
    """Keyed permutation + secret random matrix (XNN): accuracy exactly raw (orthogonal)."""

    scheme = "xnn"
    scheme_version = 1
    accuracy_tolerance = 0.0005
    config_class = XNNConfig
    config: XNNConfig
    # Orthogonal: cosine of templates = cosine of raw embeddings, so the extractor's
    # calibrated thresholds hold. Gaussian: a key-dependent distortion, no threshold ships.
    preserves_scores = True

    @classmethod
    def scores_preserved(cls, config: XNNConfig) -> bool:
        return config.matrix == "orthogonal"

    def __init__(self, *, dim: int, key: Key | None, config: XNNConfig | None = None) -> None:
        super().__init__(dim=dim, key=key, config=config)
        if self.config.matrix == "gaussian":
            # A random projection only approximates cosine scores.
            self.accuracy_tolerance = 0.01  # type: ignore[misc]

    @cached_property
    def _transform(self) -> np.ndarray:
        """The combined matrix T = M · P (float64), so that template = T · x."""
        assert self._key is not None
        d = self.dim
        label = f"xnn/v{self.scheme_version}/{self.config.matrix}/{d}"
        perm = _permutation(self._key, label + "/perm", d)
        g = _gaussian(self._key, label + "/matrix", (d, d))
        if self.config.matrix == "orthogonal":
            q, r = np.linalg.qr(g)
            m = q * np.sign(np.diag(r))  # unique Haar-distributed orthogonal matrix
        else:
            m = g / np.sqrt(d)
        permutation_matrix = np.eye(d)[perm]
        return m @ permutation_matrix

    @cached_property
    def _transform_t32(self) -> np.ndarray:
        """T transposed, float32: protection runs in float32 (5x the float64 throughput,
        benchmarks/protect_throughput.py; templates agree with a float64 product to ~2e-7,
        far below anything a float32 index or score resolves)."""
        return np.ascontiguousarray(self._transform.T, dtype=np.float32)

    def _protect(self, raw: np.ndarray) -> np.ndarray:
        return l2_normalize(l2_normalize(np.asarray(raw, np.float32)) @ self._transform_t32)

    def rotation_to(self, other: Protector) -> KeyRotation | None:
        """T_other · T_self^-1: re-keys stored templates without raw embeddings (None for
        another scheme, dimension or matrix kind)."""
        if not isinstance(other, XNNProtector) or other.dim != self.dim or other.config != self.config:
            return None
        t = self._transform
        inverse = t.T if self.config.matrix == "orthogonal" else np.linalg.inv(t)
        return KeyRotation(
            matrix=other._transform @ inverse,
            from_key_id=self.metadata.key_id or "",
            to_key_id=other.metadata.key_id or "",
        )
