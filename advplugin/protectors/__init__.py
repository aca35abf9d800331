"""Protection schemes. Importing this package registers every built-in scheme."""

from advplugin.protectors import advface, none, xnn, xnnd  # noqa: F401  (registration side effect)
from advplugin.protectors.base import (
    SCHEMES,
    KeyRotation,
    Protector,
    ProtectorMetadata,
    SchemeInfo,
    ScoreFn,
    WeightsFile,
    create_protector,
    list_schemes,
    register_scheme,
    scheme_info,
    validate_embeddings,
)
from advplugin.protectors.calibration import Calibration, calibration_for

__all__ = [
    "SCHEMES",
    "Calibration",
    "KeyRotation",
    "Protector",
    "ProtectorMetadata",
    "SchemeInfo",
    "ScoreFn",
    "WeightsFile",
    "calibration_for",
    "create_protector",
    "list_schemes",
    "register_scheme",
    "scheme_info",
    "validate_embeddings",
]
