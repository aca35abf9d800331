"""`xnn-d`: generative adversarial noise, a distilled matcher, then a keyed transform.

After XNN-d (Liu et al. 2024), on the embedding a deployment stores rather than inside the
network. Trained by `advplugin.training.xnnd` (docs/schemes/xnn-d.md: data, losses, numbers):

    u = x / ||x||
    f = u + G(u)                 generator: adversarial noise against a surrogate identity
                                 classifier and a regressor back to u (trained in a game)
    e = S(f) / ||S(f)||          distilled matcher: reads the noisy f, reproduces the clean
                                 embedding's geometry (release 2: an affine map fitted to u;
                                 release 1: an MLP distilled from a teacher head on u)
    template = T_k e             `xnn` orthogonal transform of a sub-key of the gallery key

Why the key comes last: S is shipped (it is in the package), so on its own anyone could run
it; T_k around it makes the pair (S, T_k) the deployment's secret matcher - a keyed output
transform around a shipped S. Because T_k is orthogonal, cosine in the template space IS the
matcher's score, so (1) the scorer needs no key (template mode works, `CosineScorer`),
(2) the search index holds what S produces, under the key, and (3) a key rotation is the
matrix T_k2 T_k1^-1, applied to stored templates without raw embeddings (renewability).

Honest scope: G and S are fixed, public functions, so the noise protects the intermediate f
(what an XNN-d client would hand a matching cloud) only against identity heads trained
through G - not against an attacker who runs the public G on its own photos and inverts it
(G is nearly affine on dlib embeddings; that inverse is what release 2's S is) - and not the
stored template: whoever holds the key, or fits T_k from ~`dim` known (photo,
template) pairs, holds a face embedding as discriminative as raw. Against a copied gallery
without the key it stops what `xnn` stops; measured figures in docs/schemes/xnn-d.md.

Inference is numpy (small float32 MLPs and one orthogonal matrix), no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from advplugin.keys import Key
from advplugin.protectors.base import (
    KeyRotation,
    Protector,
    TrainedProtector,
    WeightsFile,
    l2_normalize,
    register_scheme,
)
from advplugin.protectors.calibration import DLIB_EXTRACTORS, Calibration, measured
from advplugin.protectors.xnn import XNNProtector

#: Shipped weights releases, per embedding dimension (dlib's 128-d), with their SHA-256.
#: A release keeps G; what changes is S (docs/schemes/xnn-d.md, "Releases"). Templates of two
#: releases are different spaces: the weights' SHA-256 is in every row's config digest, so a
#: gallery enrolled with release 1 is read with `release=1` and never mixed with release 2.
RELEASES: dict[int, dict[int, WeightsFile]] = {
    1: {
        128: WeightsFile(
            "xnnd-dlib128-v1.npz",
            "e0f70fb2ea182caa6d0842bfd490d84d001f7c9806a4d05dc84b5997cf2c700d",
        ),
    },
    2: {
        128: WeightsFile(
            "xnnd-dlib128-v2.npz",
            "a1fc72521c291b50834aa4b3c99be5d139b93eb53e3a7afdab39e9b71dc37971",
        ),
    },
}
LATEST_RELEASE = max(RELEASES)
#: The default (latest) release's weights: what `SchemeInfo` lists.
WEIGHTS = RELEASES[LATEST_RELEASE]

#: Decision thresholds of each release's templates (cosine of S's embeddings: the keyless
#: scorer), measured by `benchmarks/calibrate.py` on dlib's descriptors, the only ones weights
#: exist for (`dlib-torch` computes the same). Why not dlib's own: S is not the identity, so
#: its scores are its own (release 1's thresholds sit up to 0.009 below raw ones). The key
#: acts last and is orthogonal, so it does not change them. Rerun the command after refitting
#: a release, and update these with its weights' SHA-256.
MEASURED: dict[int, Calibration] = {
    1: measured(
        (0.8987, 0.9208, 0.9380, 0.9517),
        (0.0115, 0.0644, 0.2328, 0.5119),
        what="cosine of xnn-d release 1 templates",
    ),
    2: measured(
        (0.9074, 0.9259, 0.9406, 0.9527),
        (0.0086, 0.0493, 0.1875, 0.4516),
        what="cosine of xnn-d release 2 templates",
    ),
}
CALIBRATIONS: dict[str, dict[int, Calibration]] = {name: MEASURED for name in DLIB_EXTRACTORS}

Layers = tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight [in, out], bias [out]) per layer


@dataclass(frozen=True)
class XNNDConfig:
    #: A weights file other than the shipped one (e.g. one trained on your own embeddings).
    weights: str | None = None
    #: Which shipped release to load when `weights` is not given: the latest by default, 1 for
    #: galleries enrolled before release 2 (their rows' config digest is release 1's).
    release: int = LATEST_RELEASE


def mlp(h: np.ndarray, layers: Layers) -> np.ndarray:
    """ReLU MLP in float32 (the torch modules of the trainer, layer for layer)."""
    h = h.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


@dataclass(frozen=True)
class XNNDNets:
    """The shipped generator G and distilled matcher S as plain arrays."""

    generator: Layers
    matcher: Layers

    @property
    def dim(self) -> int:
        return int(self.generator[0][0].shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.matcher[-1][0].shape[1])

    def noisy(self, u: np.ndarray) -> np.ndarray:
        """f = u + G(u) for unit rows u: the perturbed feature (never stored)."""
        return u.astype(np.float32) + mlp(u, self.generator)

    def match_features(self, f: np.ndarray) -> np.ndarray:
        """Unit S(f): the distilled matcher's embedding of perturbed features."""
        return l2_normalize(mlp(f, self.matcher))


def _layers(data: np.lib.npyio.NpzFile, prefix: str) -> Layers:
    n = int(data[f"{prefix}_layers"])
    return tuple(
        (data[f"{prefix}{i}_w"].astype(np.float32), data[f"{prefix}{i}_b"].astype(np.float32))
        for i in range(n)
    )


def load_weights(path: Path) -> tuple[XNNDNets, dict[str, object]]:
    """Generator, matcher and the training record of an `xnn-d` weights file."""
    if not path.is_file():
        raise ValueError(f"xnn-d weights {path} not found")
    with np.load(path, allow_pickle=False) as data:
        nets = XNNDNets(_layers(data, "g"), _layers(data, "s"))
        record = json.loads(str(data["record"]))
    return nets, record


@register_scheme
class XNNDProtector(TrainedProtector):
    """Generative adversarial noise + distilled matcher (XNN-d), then a keyed transform."""

    scheme = "xnn-d"
    scheme_version = 1
    # Measured drop on lfw-dev pairs is in docs/schemes/xnn-d.md; this is the promise.
    accuracy_tolerance = 0.01
    config_class = XNNDConfig
    config: XNNDConfig
    weights = WEIGHTS
    version_option = "release"
    versions = RELEASES
    trainer = "advplugin train xnn-d --embeddings RAW.npz"
    calibrations = CALIBRATIONS

    def __init__(self, *, dim: int, key: Key | None, config: XNNDConfig | None = None) -> None:
        super().__init__(dim=dim, key=key, config=config)
        self._weights = self.weights_path_for(dim, self.config)
        nets, record = load_weights(self._weights)
        if nets.dim != dim or nets.output_dim != dim:
            raise ValueError(f"xnn-d weights {self._weights.name} are not for dimension {dim}")
        self.nets = nets
        self.record = record

    @classmethod
    def make_config(cls, **options: object) -> XNNDConfig:
        config: XNNDConfig = super().make_config(**options)
        if config.release not in RELEASES:
            raise ValueError(
                f"xnn-d has no release {config.release!r}; releases: {sorted(RELEASES)}"
            )
        return config

    @cached_property
    def _keyed(self) -> XNNProtector:
        """The xnn transform under a sub-key, so that an `xnn` (or `advface`) gallery under
        the same gallery key is a different space."""
        assert self._key is not None
        sub = Key(self._key.derive(f"xnn-d/v{self.scheme_version}/xnn", 32))
        return XNNProtector(dim=self.output_dim, key=sub)

    def matcher_embedding(self, raw: np.ndarray) -> np.ndarray:
        """S(u + G(u)) before the key: what an attacker holding the key faces (evaluation)."""
        u = raw.astype(np.float64)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return self.nets.match_features(self.nets.noisy(u))

    def _protect(self, raw: np.ndarray) -> np.ndarray:
        return self._keyed._protect(self.matcher_embedding(raw))

    def rotation_to(self, other: Protector) -> KeyRotation | None:
        """Re-keys stored templates: the key acts last and is orthogonal, so old -> new is
        the `xnn` rotation of the two sub-keys (None for other weights, options or dims)."""
        if (
            not isinstance(other, XNNDProtector)
            or other.dim != self.dim
            or other.metadata.config_digest != self.metadata.config_digest
        ):
            return None
        inner = self._keyed.rotation_to(other._keyed)
        if inner is None:
            return None
        return KeyRotation(
            matrix=inner.matrix,
            from_key_id=self.metadata.key_id or "",
            to_key_id=other.metadata.key_id or "",
        )
