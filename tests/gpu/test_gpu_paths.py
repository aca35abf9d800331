"""The `gpu` extra's path (issue 14, Build 5): a GPU is used when the installed packages see
one (faiss-gpu for the flat index, onnxruntime-gpu for ONNX models, a CUDA torch for
`dlib-torch`), the CPU otherwise, with the same results within float tolerance.

The fallback tests run everywhere. The ones marked `needs_gpu` compare GPU and CPU results
and run only where a GPU exists: the CI machine and this project's development machine have
none, so there they are skipped with that reason (`scripts/device_check.sh` runs them on a
GPU machine and writes benchmarks/results/gpu.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from advplugin.gallery.backends import IndexConfig, create_index_backend
from advplugin.gallery.backends.faiss_backends import gpu_count

FACE_DATA = Path(os.environ.get("ADVPLUGIN_FACE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_faiss_gpu = pytest.mark.skipif(gpu_count() == 0, reason="faiss sees no GPU (faiss-cpu or no device)")
needs_torch_gpu = pytest.mark.skipif(not _torch_cuda(), reason="this torch build sees no CUDA device")
needs_ort_gpu = pytest.mark.skipif(not _ort_cuda(), reason="onnxruntime has no CUDA provider (no gpu extra)")


def _gallery(n: int = 20_000, dim: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, 64, replace=False)] + 0.05 * rng.normal(size=(64, dim)).astype(np.float32)
    return np.arange(n, dtype=np.int64) * 3 + 1, x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _flat(use_gpu: bool, ids: np.ndarray, x: np.ndarray):  # type: ignore[no-untyped-def]
    backend = create_index_backend("faiss-flat", dim=x.shape[1], config=IndexConfig(use_gpu=use_gpu))
    backend.add(ids, x)
    return backend


# -- fallback: everywhere ------------------------------------------------------------------------
def test_flat_index_asking_for_a_gpu_falls_back_to_the_cpu_with_the_same_answers() -> None:
    ids, x, q = _gallery(3_000)
    wanted, plain = _flat(True, ids, x), _flat(False, ids, x)
    (s1, i1), (s0, i0) = wanted.search(q, 10), plain.search(q, 10)
    if gpu_count() == 0:  # nothing to clone to: the very same CPU index answers
        assert wanted._searcher() is wanted._index
        np.testing.assert_array_equal(i1, i0)
    else:
        assert wanted._searcher() is not wanted._index
    np.testing.assert_allclose(s1, s0, atol=1e-4)


def test_torch_device_auto_follows_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from advplugin.nets.dlib_resnet import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="sees no such GPU"):
        torch_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto").type == "cuda"
    for bad in ("tpu", "nonsense:x"):
        with pytest.raises(ValueError, match="device"):
            torch_device(bad)


def test_onnx_providers_prefer_cuda_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    from advplugin.adapters.onnx_adapter import onnx_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert onnx_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# -- GPU machines only ---------------------------------------------------------------------------
@needs_faiss_gpu
def test_faiss_gpu_flat_search_equals_the_cpu() -> None:
    ids, x, q = _gallery()
    (sg, ig), (sc, ic) = _flat(True, ids, x).search(q, 50), _flat(False, ids, x).search(q, 50)
    np.testing.assert_allclose(sg, sc, atol=1e-4)
    assert (ig[:, 0] == ic[:, 0]).mean() == 1.0


@needs_torch_gpu
def test_dlib_torch_on_the_gpu_gives_the_cpu_descriptors() -> None:
    from advplugin.adapters.dlib_adapter import resnet_model_path
    from advplugin.nets.dlib_resnet import ChipEmbedder

    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, size=(16, 150, 150, 3), dtype=np.uint8)
    cpu = ChipEmbedder(resnet_model_path(), device="cpu")(chips)
    gpu = ChipEmbedder(resnet_model_path(), device="cuda")(chips)
    assert np.abs(gpu - cpu).max() < 2e-3  # TF32 convolutions where the GPU has them
    assert (np.sum(gpu * cpu, 1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)).min() > 0.9999


@needs_ort_gpu
def test_onnx_model_on_cuda_equals_the_cpu() -> None:
    import onnxruntime as ort

    model = FACE_DATA.parent / "models" / "mobileface.onnx"
    if not model.is_file():
        pytest.skip(f"no ONNX model at {model}")
    from advplugin.adapters.onnx_adapter import onnx_providers

    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    gpu = ort.InferenceSession(str(model), providers=onnx_providers())  # as the adapter opens it
    # Really on the GPU: a CUDA provider that fails to load falls back to the CPU silently.
    assert gpu.get_providers()[0] == "CUDAExecutionProvider", gpu.get_providers()
    inp = cpu.get_inputs()[0]
    shape = [d if isinstance(d, int) else 4 for d in inp.shape]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    (a,), (b,) = cpu.run(None, {inp.name: x})[:1], gpu.run(None, {inp.name: x})[:1]
    # Compared as a matcher compares them, by cosine: the CUDA provider convolves in TF32 by
    # default, which moved raw outputs of ~5 by up to 0.024 on an H200.
    a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (a, b))
    assert (a * b).sum(1).min() > 0.9999
    assert np.abs(a - b).max() < 5e-3
