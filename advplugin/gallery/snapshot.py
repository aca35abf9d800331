"""The index snapshot file: one npz holding a backend's serialised state and a JSON header.

Written atomically (temp file, fsync, rename), so a crash at any moment leaves either the old
or the new snapshot, each complete and carrying the change-log position it really contains;
mode 0600 in a folder made 0700, because the vectors are protected templates of real people.

Sealed galleries seal their snapshots (the decision and its measurement:
docs/sealed-storage.md): the backend's blob is AES-256-GCM-sealed under a key derived from
the gallery data key, bound to the header (database fingerprint, backend, dimension,
change-log position), so a copied snapshot is as useless as a copied database, and a header
edited to pass a snapshot off as another gallery's, or as newer, fails authentication. The
header itself stays readable (it holds no vector). `shred_previous` overwrites the file
being replaced before the rename, so the blocks of a snapshot that still held a deleted
template do not linger on disk with their content (on file systems that write in place).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from advplugin.gallery.backends import IndexBackend, IndexConfig, index_backend_class
from advplugin.gallery.sealing import Sealer, TamperedError, associated_data

#: What reading a damaged, foreign or tampered file can raise; the caller rebuilds instead.
UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, TamperedError)


def _snapshot_ad(meta: dict[str, Any]) -> bytes:
    header = {k: v for k, v in meta.items() if k != "sealed"}
    return associated_data("snapshot/v1", json.dumps(header, sort_keys=True))


def write_snapshot(
    path: Path, blob: bytes | bytearray, meta: dict[str, Any], *, sealer: Sealer | None = None,
    shred_previous: bool = False,
) -> None:
    """Write a snapshot atomically; sealed when `sealer` is given (a sealed gallery), under a
    fresh erasure key when the gallery has an erasure key store: the previous snapshot's is
    shredded once this one is in place, so a copy of an older snapshot file opens nothing."""
    erasure = None
    if sealer is not None:
        scope = _scope(meta)
        erasure = sealer.snapshot_erasure_key(scope)
        if erasure is not None:
            meta = {**meta, "erasure_ref": erasure[0].hex()}
        serial, blob = sealer.seal_blob(blob, _snapshot_ad(meta), erasure[1] if erasure else None)
        meta = {**meta, "sealed": serial}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    if shred_previous:
        _overwrite(path)
    os.replace(tmp, path)
    if sealer is not None and erasure is not None:
        sealer.shred_old_snapshots(scope, erasure[0])


def _scope(meta: dict[str, Any]) -> str:
    """Which index a snapshot is of (its erasure keys are shredded per scope)."""
    return hashlib.sha256(str(meta.get("fingerprint")).encode()).hexdigest()[:32]


def _overwrite(path: Path) -> None:
    """Zero a file in place (then it is replaced): its old content must not survive in the
    freed blocks. Best effort: copy-on-write file systems and SSD remapping keep old blocks
    anyway, which is why sealed snapshots matter more than this."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "wb") as f:
        size = os.fstat(f.fileno()).st_size
        zeros = bytes(1 << 20)
        for start in range(0, size, len(zeros)):
            f.write(zeros[: min(len(zeros), size - start)])
        f.flush()
        os.fsync(f.fileno())


def read_snapshot(path: Path, *, sealer: Sealer | None = None) -> tuple[dict[str, Any], bytes]:
    """(header, backend blob), opened with `sealer` when sealed; raises one of UNREADABLE if
    the file is not a snapshot, is sealed and no sealer is given, fails authentication, or
    its erasure key was shredded."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if not isinstance(meta, dict):
            raise ValueError("snapshot header is not an object")
        if "sealed" not in meta:
            return meta, bytes(data["index"])
        if sealer is None:
            raise ValueError("snapshot is sealed and no gallery key was given")
        ref = meta.get("erasure_ref")
        erasure_key = sealer.snapshot_key_of(bytes.fromhex(str(ref))) if ref is not None else None
        # Opened straight from the array np.load read: no copy beyond the decryption.
        return meta, sealer.open_blob(
            int(meta["sealed"]), memoryview(data["index"]), _snapshot_ad(meta), erasure_key
        )


def open_snapshot(
    path: Path, config: IndexConfig | None = None, *, sealer: Sealer | None = None
) -> tuple[dict[str, Any], IndexBackend]:
    """(header, backend) of a snapshot file, restored by the backend its header names, for
    inspection (`TemplateIndex.load` also checks that it belongs to the gallery). Search
    parameters come from `config` when given."""
    meta, blob = read_snapshot(path, sealer=sealer)
    cls = index_backend_class(str(meta.get("backend")))
    config = config or IndexConfig(backend=cls.name)
    return meta, cls.deserialize(blob, dim=int(meta["dim"]), config=config)
