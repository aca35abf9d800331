"""`none`: the identity. A baseline for evaluation only: its templates ARE raw embeddings,
so the service refuses it unless the operator explicitly allows it."""

from __future__ import annotations

import numpy as np

from advplugin.protectors.base import Protector, register_scheme


@register_scheme
class NoneProtector(Protector):
    """The identity: templates are raw embeddings (evaluation baseline only)."""

    scheme = "none"
    scheme_version = 1
    accuracy_tolerance = 0.0
    protects = False
    keyed = False
    preserves_scores = True  # templates are the raw embeddings: the extractor's calibration

    def _protect(self, raw: np.ndarray) -> np.ndarray:
        return raw.copy()
