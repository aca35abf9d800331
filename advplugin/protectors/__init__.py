"""Protection schemes. Importing this package registers every built-in scheme."""

from advplugin.protectors import advface, none, xnn  # noqa: F401  (registration side effect)
from advplugin.protectors.base import (
    SCHEMES,
    Protector,
    ProtectorMetadata,
    create_protector,
    list_schemes,
    register_scheme,
    validate_embeddings,
)
from advplugin.protectors.xnn import KeyRotation, xnn_rotation

__all__ = [
    "SCHEMES",
    "KeyRotation",
    "Protector",
    "ProtectorMetadata",
    "create_protector",
    "list_schemes",
    "register_scheme",
    "validate_embeddings",
    "xnn_rotation",
]
