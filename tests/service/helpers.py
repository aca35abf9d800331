"""Shared helpers of the service tests: the example client, LFW splits, raw-vector scans,
the templates-mode environment and the index backends the suites run on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO


def example_client_module():
    """examples/client.py (not installed), so the tests exercise the bundled example client."""
    spec = importlib.util.spec_from_file_location("advplugin_example_client", REPO / "examples" / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_vs_rest(identity: np.ndarray, path: np.ndarray, max_identities: int | None = None,
                  max_images: int | None = None) -> tuple[list[int], list[int]]:
    """Gallery = the first image of every identity with >= 2 images; probes = its others."""
    order = np.argsort(path, kind="stable")
    by_id: dict[str, list[int]] = {}
    for i in order:
        by_id.setdefault(str(identity[i]), []).append(int(i))
    gallery, probes = [], []
    names = sorted(n for n, idx in by_id.items() if len(idx) >= 2)
    for n in names[:max_identities]:
        idx = by_id[n][:max_images]
        gallery.append(idx[0])
        probes.extend(idx[1:])
    return gallery, probes


def protection_of(protector, extractor_name: str = "dlib") -> dict:
    m = protector.metadata
    return {"scheme": m.scheme, "scheme_version": m.scheme_version, "key_id": m.key_id,
            "extractor_name": extractor_name, "extractor_version": "test"}


def raw_patterns(raw: np.ndarray) -> list[bytes]:
    """Byte patterns whose presence would reveal a raw embedding: 4 consecutive float32 dims
    (16 bytes) and 2 consecutive float64 dims, of the raw and of the L2-normalised vector,
    and short text renderings of 3 consecutive dims."""
    pats: list[bytes] = []
    for v in (raw, raw / np.linalg.norm(raw)):
        f32, f64 = v.astype("<f4"), v.astype("<f8")
        for j in (0, 40, 100):
            pats.append(f32[j : j + 4].tobytes())
            pats.append(f64[j : j + 2].tobytes())
            pats.append(", ".join(f"{x:.4f}" for x in f32[j : j + 3]).encode())
            pats.append(" ".join(f"{x:.4f}" for x in f32[j : j + 3]).encode())
    return pats


def assert_no_raw_bytes(blob: bytes, raws: np.ndarray, where: str) -> None:
    for r in raws:
        for pat in raw_patterns(r):
            assert pat not in blob, f"a raw-embedding pattern was found in {where}"


def max_cosine(stored: np.ndarray, raws: np.ndarray) -> float:
    a = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    b = raws / np.linalg.norm(raws, axis=1, keepdims=True)
    return float(np.abs(a @ b.T).max())


def vectors_in_blob(blob: bytes, dim: int) -> np.ndarray:
    """Every float32 [dim] vector at any 4-byte-aligned offset of a byte dump that looks like
    a unit vector (what protected templates are): found regardless of the storage layout."""
    usable = len(blob) // 4 * 4
    out = []
    for shift in range(4):
        a = np.frombuffer(blob[shift : shift + usable - 4], dtype="<f4")
        if len(a) < dim:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(a, dim)
        with np.errstate(all="ignore"):
            norms = np.einsum("ij,ij->i", windows, windows)
        hits = np.where(np.isfinite(norms) & (np.abs(norms - 1) < 1e-3))[0]
        out.extend(windows[h] for h in hits)
    return np.array(out, np.float64).reshape(-1, dim)


def files_blob(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.is_file())


def template_env(url: str, tmp_path, key) -> dict[str, str]:
    """The service's environment in templates mode (xnn, 128-d) on `url`."""
    return {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    }


#: The service suites run on both index backends: FAISS (default) and Milvus (milvus-lite
#: embedded in the data folder, as a single node uses it; replicas: test_milvus_replicas.py).
INDEXES = [
    pytest.param("faiss-flat", id="faiss"),
    pytest.param("milvus", id="milvus", marks=pytest.mark.skipif(
        importlib.util.find_spec("milvus_lite") is None, reason="milvus-lite not installed (extra `milvus`)")),
]


def index_env(index: str) -> dict[str, str]:
    return {"ADVPLUGIN_INDEX__BACKEND": index}
