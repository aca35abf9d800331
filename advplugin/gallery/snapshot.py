"""The index snapshot file: one npz holding a backend's serialised state and a JSON header.

Written atomically (temp file, fsync, rename), so a crash at any moment leaves either the old
or the new snapshot, each complete and carrying the change-log position it really contains;
mode 0600, because the vectors are protected templates of real people.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from advplugin.gallery.backends import IndexBackend, IndexConfig, index_backend_class

#: What reading a damaged or foreign file can raise; the caller rebuilds instead.
UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def write_snapshot(path: Path, blob: bytes, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    buf = io.BytesIO()
    np.savez(
        buf,
        index=np.frombuffer(blob, np.uint8),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, backend blob); raises one of UNREADABLE if the file is not a snapshot."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if not isinstance(meta, dict):
            raise ValueError("snapshot header is not an object")
        return meta, bytes(data["index"])


def open_snapshot(path: Path, config: IndexConfig | None = None) -> tuple[dict[str, Any], IndexBackend]:
    """(header, backend) of a snapshot file, restored by the backend its header names, for
    inspection (`TemplateIndex.load` also checks that it belongs to the gallery). Search
    parameters come from `config` when given."""
    meta, blob = read_snapshot(path)
    cls = index_backend_class(str(meta.get("backend")))
    config = config or IndexConfig(backend=cls.name)
    return meta, cls.deserialize(blob, dim=int(meta["dim"]), config=config)
