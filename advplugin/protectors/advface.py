"""`advface`: adversarial latent noise against face decoders (AdvFace), then a keyed transform.

After AdvFace (Wang et al., CVPR 2023), on the embedding rather than inside the network.

The operator trains a *shadow decoder* (dlib embedding -> aligned face) that plays the
attacker, and an *amortised noise generator* g that moves every embedding, within a drift
budget, in the direction that most changes what the shadow decoder draws, while keeping the
pairwise cosine structure (so genuine pairs stay matched). See `advplugin.training.advface` and
docs/schemes/advface.md for the data, losses and measured numbers.

Two versions of the weights ship (`version` option; same formulas, other generator):
version 1 optimised the shadow image only, against a fixed L1 shadow decoder; version 2
(`advplugin.training.advface_v2`) the complete loop - shadow image, shadow feature through
dlib's own network, reconstructed image - against an identity-trained shadow decoder and an
adaptive one retrained on protected templates during training.

    u = x / ||x||,   n = g(u) projected orthogonal to u,   a = a_max * sigmoid(g_a(u))
    t = cos(a) u + sin(a) n / ||n||          # cosine(x, t) = cos(a) >= min_cosine exactly
    template = T_key t                       # xnn transform under a key derived for advface

The budget holds by construction, not by training, so no input can drift further than
`min_cosine`. The noise is a deterministic function of the input (no sampling), so the same
key always gives the same template. The keyed transform (a sub-key of the gallery key, so an
`xnn` gallery under the same key is not the same space) makes templates unlinkable across
keys; `transform="none"` drops it and exists only to measure what an attacker who holds the
key faces - the noise alone.

Honest scope: the noise is a fixed function, so an attacker who can enrol images of people
they know (the adaptive attacker) can train a decoder on protected templates and learn to
undo it, and as trained the map is nearly linear (a least-squares fit from ~64 pairs inverts
it). It defeats decoders trained on raw embeddings, not adaptive ones; the measured figures
are in docs/schemes/advface.md.

Inference is numpy (a three-layer float32 MLP, the geometry in float64), no torch: about
26k templates per second on one idle core, a tenth of `xnn`. Optional `refine_steps` run a
few gradient steps per template against the shipped shadow decoder (torch), trading speed
for disruption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

from advplugin.keys import Key
from advplugin.protectors.base import (
    TrainedProtector,
    WeightsFile,
    l2_normalize,
    register_scheme,
)
from advplugin.protectors.calibration import DLIB_EXTRACTORS, Calibration, measured
from advplugin.protectors.xnn import XNNProtector

#: Shipped weights per version and embedding dimension (only dlib's 128-d exist), with their
#: SHA-256. Version 1: the shadow-image loop against a fixed L1 shadow decoder; version 2:
#: the complete loop (shadow image, shadow feature through dlib's ResNet, reconstructed
#: image) and an adaptive shadow decoder retrained during training (docs/schemes/advface.md).
#: Templates of two versions are different spaces: the weights' SHA-256 is in every row's
#: config digest, so a gallery enrolled with version 1 is read with `version=1`.
VERSIONS: dict[int, dict[int, WeightsFile]] = {
    1: {
        128: WeightsFile(
            "advface-dlib128-v1.npz",
            "6396ac82b8c1801281ff03907fc25728f4ec7238c497b8efac630486e50589f2",
        ),
    },
    2: {
        128: WeightsFile(
            "advface-dlib128-v2.npz",
            "c89203e9083bc5273e92d5141c5141cf8faa9a66393e500a05f7a5e325afe268",
        ),
    },
}
#: The version a protector uses when no `version` option is given.
DEFAULT_VERSION = 1
#: The default version's weights: what `SchemeInfo` lists.
WEIGHTS = VERSIONS[DEFAULT_VERSION]

#: Decision thresholds of each version's templates (cosine: the keyless scorer), measured by
#: `benchmarks/calibrate.py` on dlib's descriptors, the only ones weights exist for (`dlib-torch`
#: computes the same). Why not dlib's own: the noise moves every pairwise cosine a little,
#: and the thresholds with it (v2's at FMR 1e-2 by +0.0019). The keyed transform is orthogonal,
#: so neither the key nor `transform` changes them; `refine_steps` does (unmeasured: None).
#: Rerun the command after retraining a version, and update these with its weights' SHA-256.
MEASURED: dict[int, Calibration] = {
    1: measured(
        (0.9075, 0.9261, 0.9411, 0.9532),
        (0.0089, 0.0494, 0.1879, 0.4483),
        what="cosine of advface version 1 templates",
    ),
    2: measured(
        (0.9092, 0.9271, 0.9409, 0.9522),
        (0.0093, 0.0494, 0.1732, 0.4043),
        what="cosine of advface version 2 templates",
    ),
}
CALIBRATIONS: dict[str, dict[int, Calibration]] = {name: MEASURED for name in DLIB_EXTRACTORS}

Transform = Literal["xnn", "none"]


@dataclass(frozen=True)
class AdvFaceConfig:
    transform: Transform = "xnn"
    refine_steps: int = 0
    refine_lr: float = 0.005
    weights: str | None = None
    #: Which shipped weights to load when `weights` is not given (galleries enrolled with an
    #: earlier version keep being read with it: `version=1`).
    version: int = DEFAULT_VERSION

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"advface has no version {self.version!r}; versions: {sorted(VERSIONS)}")
        if self.transform not in ("xnn", "none"):
            raise ValueError(f"advface transform must be 'xnn' or 'none', got {self.transform!r}")
        if not isinstance(self.refine_steps, int) or not 0 <= self.refine_steps <= 100:
            raise ValueError("advface refine_steps must be an integer from 0 to 100")
        if not 0 < float(self.refine_lr) <= 1:
            raise ValueError("advface refine_lr must be in (0, 1]")


@dataclass(frozen=True)
class NoiseGenerator:
    """The trained generator g as plain arrays (numpy inference; training is in torch with
    the same formulas in `advplugin.nets.advface.torch_noisy`)."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight [in, out], bias [out])
    max_angle: float  # radians: arccos(min_cosine)

    @property
    def min_cosine(self) -> float:
        return float(np.cos(self.max_angle))

    def direction_and_angle(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit noise direction orthogonal to each unit input, and its angle (radians)."""
        h = (u * np.sqrt(u.shape[1])).astype(np.float32)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        d, logit = h[:, :-1].astype(np.float64), h[:, -1].astype(np.float64)
        n = d - np.sum(d * u, axis=1, keepdims=True) * u
        n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
        return n, self.max_angle / (1.0 + np.exp(-logit))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        n, angle = self.direction_and_angle(u)
        return np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * n


def load_weights(path: Path) -> tuple[NoiseGenerator, dict[str, np.ndarray], dict[str, object]]:
    """Generator, shadow-decoder state (for refinement) and the training record."""
    if not path.is_file():
        raise ValueError(f"advface weights {path} not found")
    with np.load(path, allow_pickle=False) as data:
        n_layers = int(data["n_layers"])
        layers = tuple(
            (data[f"g{i}_w"].astype(np.float32), data[f"g{i}_b"].astype(np.float32))
            for i in range(n_layers)
        )
        decoder = {k[len("dec/") :]: data[k] for k in data.files if k.startswith("dec/")}
        record = json.loads(str(data["record"]))
        generator = NoiseGenerator(layers, float(data["max_angle"]))
    return generator, decoder, record


@register_scheme
class AdvFaceProtector(TrainedProtector):
    """Trained adversarial latent noise against face decoders (AdvFace), then a keyed transform."""

    scheme = "advface"
    # Stays 1: it enters every config digest, and v1 galleries must keep theirs. The weights
    # versions are the `version` option (their SHA-256 tells the digests apart).
    scheme_version = 1
    # Measured drop on lfw-dev pairs is in docs/schemes/advface.md; this is the promise.
    accuracy_tolerance = 0.01

    config_class = AdvFaceConfig
    config: AdvFaceConfig
    weights = WEIGHTS
    version_option = "version"
    versions = VERSIONS
    trainer = "advplugin train advface"
    calibrations = CALIBRATIONS

    @classmethod
    def calibration_version(cls, config: AdvFaceConfig) -> int | None:
        # Refinement steps per template move scores beyond the generator's: never measured.
        return None if config.refine_steps else super().calibration_version(config)

    def __init__(self, *, dim: int, key: Key | None, config: AdvFaceConfig | None = None) -> None:
        super().__init__(dim=dim, key=key, config=config)
        self._weights = self.weights_path_for(dim, self.config)
        generator, _, record = load_weights(self._weights)
        if generator.layers[0][0].shape[0] != dim:
            raise ValueError(f"advface weights {self._weights.name} are not for dimension {dim}")
        self.generator = generator
        self.record = record
        if self.config.refine_steps:
            # Per-template steps ignore the pairwise structure the generator keeps.
            self.accuracy_tolerance = 0.02  # type: ignore[misc]

    @property
    def weights_version(self) -> int:
        """The version of the loaded generator (its training record; v1's has none)."""
        return int(self.record.get("scheme_version", 1))  # type: ignore[call-overload]

    @property
    def min_cosine(self) -> float:
        return self.generator.min_cosine

    @cached_property
    def _keyed(self) -> XNNProtector | None:
        """The xnn transform under a sub-key: the same gallery key used for `xnn` and
        `advface` must not put both galleries in one space."""
        if self.config.transform == "none":
            return None
        assert self._key is not None
        # v1's sub-key name is unchanged (its galleries keep matching); v2's is another space.
        sub = Key(self._key.derive(f"advface/v{self.weights_version}/xnn", 32))
        return XNNProtector(dim=self.dim, key=sub)

    def noisy(self, raw: np.ndarray) -> np.ndarray:
        """Unit embeddings moved by the adversarial noise, before the keyed transform."""
        u = raw.astype(np.float64)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        if self.config.refine_steps:
            return self._refined(u)
        return self.generator(u)

    @cached_property
    def _shadow_decoder_state(self) -> dict[str, np.ndarray]:
        return load_weights(self._weights)[1]

    def _refined(self, u: np.ndarray) -> np.ndarray:
        from advplugin.nets.advface import refine

        return refine(
            u,
            self.generator,
            self._shadow_decoder_state,
            self.record,
            steps=self.config.refine_steps,
            lr=float(self.config.refine_lr),
        )

    def _protect(self, raw: np.ndarray) -> np.ndarray:
        t = self.noisy(raw).astype(np.float32)
        if self._keyed is None:
            return l2_normalize(t)
        return self._keyed._protect(t)
