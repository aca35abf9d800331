"""`none`: the identity. A baseline for evaluation only: its templates ARE raw embeddings,
so the service refuses it unless the operator explicitly allows it."""

from __future__ import annotations

import numpy as np

from advplugin.keys import Key
from advplugin.protectors.base import Protector, register_scheme


class NoneProtector(Protector):
    scheme = "none"
    scheme_version = 1
    accuracy_tolerance = 0.0
    protects = False
    keyed = False

    def _protect(self, raw: np.ndarray) -> np.ndarray:
        return raw.copy()


@register_scheme("none")
def _create_none(*, dim: int, key: Key | None = None) -> NoneProtector:
    return NoneProtector(dim=dim, key=key)
