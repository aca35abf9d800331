"""Extractor adapters, installed as `advplugin.adapters`.

Importing this package registers every adapter; adapters whose third-party package is
optional (insightface) import it only when created, so the registry always lists them.
"""

from advplugin.adapters import (  # noqa: F401
    callable_adapter,
    dlib_adapter,
    dlib_torch_adapter,
    insightface_adapter,
    onnx_adapter,
)
from advplugin.adapters.base import (
    EXTRACTORS,
    Detections,
    Extractor,
    Faces,
    create_extractor,
    list_extractors,
    register_extractor,
)

__all__ = [
    "EXTRACTORS",
    "Detections",
    "Extractor",
    "Faces",
    "create_extractor",
    "list_extractors",
    "register_extractor",
]
