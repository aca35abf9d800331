"""The `.npz` embedding-set format shared by `embed`, `protect`, `verify-pairs` and evaluation.

Arrays: `embedding` float32 [N, D], `path` (relative to the image folder), `identity`,
`detected` (1 where a detector found the face). This is exactly the layout of
`shared/data/lfw-dev-dlib128.npz`. A protected set uses the same layout with templates in
`embedding` plus a `protection` entry (JSON of the protector metadata), so a protected file
can never be mistaken for a raw one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class EmbeddingSet:
    embedding: np.ndarray
    path: np.ndarray
    identity: np.ndarray
    detected: np.ndarray
    protection: dict[str, object] | None = None

    def __post_init__(self) -> None:
        n = len(self.embedding)
        if self.embedding.ndim != 2:
            raise ValueError("embedding must be a 2-D array [N, D]")
        for name in ("path", "identity", "detected"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries, embedding has {n}"
                )

    def __len__(self) -> int:
        return len(self.embedding)

    def __repr__(self) -> str:
        return f"EmbeddingSet(n={len(self)}, dim={self.embedding.shape[1]}, protection={self.protection})"

    def index_by_path(self) -> dict[str, int]:
        return {str(p): i for i, p in enumerate(self.path)}


def load_embedding_set(path: str | os.PathLike[str]) -> EmbeddingSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} not found")
    with np.load(path, allow_pickle=False) as data:
        missing = {"embedding", "path", "identity"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}")
        emb = data["embedding"]
        protection = json.loads(str(data["protection"])) if "protection" in data.files else None
        detected = data["detected"] if "detected" in data.files else np.ones(len(emb), np.int8)
        return EmbeddingSet(
            embedding=np.asarray(emb, np.float32),
            path=data["path"].astype(str),
            identity=data["identity"].astype(str),
            detected=np.asarray(detected),
            protection=protection,
        )


def save_embedding_set(path: str | os.PathLike[str], data: EmbeddingSet) -> None:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, np.ndarray] = {
        "embedding": np.asarray(data.embedding, np.float32),
        "path": np.asarray(data.path, dtype=str),
        "identity": np.asarray(data.identity, dtype=str),
        "detected": np.asarray(data.detected, dtype=np.int8),
    }
    if data.protection is not None:
        arrays["protection"] = np.asarray(json.dumps(data.protection, sort_keys=True))
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
