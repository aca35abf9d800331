"""The GPU path against the CPU in the same run (issue 14, Build 5): flat-index search with
faiss-gpu vs faiss on the CPU, and `dlib-torch` on CUDA vs the CPU, same inputs, same results
within float tolerance.

    .venv/bin/python benchmarks/gpu.py      # on a GPU machine (scripts/device_check.sh)

Where no GPU is seen it writes what it found (`gpu_seen: false`) and measures nothing: the
figures only mean something on a machine with a device. Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, ms, table, write_results

from advplugin.gallery.backends import IndexConfig, create_index_backend
from advplugin.gallery.backends.faiss_backends import gpu_count


def median_ms(f, reps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    f()  # warm (GPU clone, cuDNN autotuning)
    t = []
    for _ in range(reps):
        a = time.perf_counter()
        f()
        t.append(time.perf_counter() - a)
    return ms(t, 50), ms(t, 99)


def faiss_rows(sizes: list[int], reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.normal(size=(n, 128)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[:64]
        ids = np.arange(n, dtype=np.int64)
        cpu, gpu = (create_index_backend("faiss-flat", dim=128, config=IndexConfig(use_gpu=g)) for g in (False, True))
        for b in (cpu, gpu):
            b.add(ids, x)
        same = float((gpu.search(q, 50)[1][:, 0] == cpu.search(q, 50)[1][:, 0]).mean())
        for batch in (1, 64):
            c50, c99 = median_ms(lambda i=cpu, b=batch, q=q: i.search(q[:b], 50), reps)
            g50, g99 = median_ms(lambda i=gpu, b=batch, q=q: i.search(q[:b], 50), reps)
            rows.append({"templates": n, "batch": batch, "cpu_p50_ms": c50, "gpu_p50_ms": g50,
                         "cpu_p99_ms": c99, "gpu_p99_ms": g99, "speedup_p50": c50 / g50, "top1_agreement": same})
    return rows


def torch_rows(reps: int) -> list[dict]:
    import torch

    from advplugin.adapters.dlib_adapter import resnet_model_path
    from advplugin.nets.dlib_resnet import ChipEmbedder

    if not torch.cuda.is_available():
        return []
    chips = np.random.default_rng(1).integers(0, 256, size=(256, 150, 150, 3), dtype=np.uint8)
    cpu = ChipEmbedder(resnet_model_path(), device="cpu", batch_size=64)
    gpu = ChipEmbedder(resnet_model_path(), device="cuda", batch_size=256)
    diff = float(np.abs(cpu(chips[:32]) - gpu(chips[:32])).max())
    c50, _ = median_ms(lambda: cpu(chips[:64]), max(2, reps // 20))
    g50, _ = median_ms(lambda: gpu(chips), reps)
    return [{"chips_per_s_cpu": 64 / (c50 / 1000), "chips_per_s_gpu": 256 / (g50 / 1000),
             "max_abs_diff": diff, "device": torch.cuda.get_device_name(0)}]


def onnx_rows(reps: int) -> list[dict]:
    """An ArcFace-style ONNX model (the project's shared mobileface.onnx) on onnxruntime's CUDA
    provider vs its CPU provider: faces/s at batch 64, the largest output difference."""
    import onnxruntime as ort

    from advplugin.adapters.onnx_adapter import onnx_providers

    model = FACE_DATA.parent / "models" / "mobileface.onnx"
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not model.is_file():
        return []
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    gpu = ort.InferenceSession(str(model), providers=onnx_providers())
    inp = cpu.get_inputs()[0]
    shape = [64] + [d if isinstance(d, int) else 112 for d in inp.shape[1:]]
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    diff = float(np.abs(cpu.run(None, {inp.name: x})[0] - gpu.run(None, {inp.name: x})[0]).max())
    c50, _ = median_ms(lambda: cpu.run(None, {inp.name: x}), max(2, reps // 10))
    g50, _ = median_ms(lambda: gpu.run(None, {inp.name: x}), reps)
    return [{"model": model.name, "batch": 64, "faces_per_s_cpu": 64 / (c50 / 1000),
             "faces_per_s_gpu": 64 / (g50 / 1000), "max_abs_diff": diff, "gpu_providers": gpu.get_providers()}]


def main() -> int:
    found = gpu_count()
    figures: dict[str, object] = {"faiss_gpus": found}
    if found:
        figures["faiss_flat"] = f = faiss_rows([100_000, 1_000_000], 100)
        table("flat search: faiss-gpu vs CPU (50 candidates)", ["templates", "batch", "cpu p50 ms", "gpu p50 ms", "speedup"],
              [[r["templates"], r["batch"], r["cpu_p50_ms"], r["gpu_p50_ms"], r["speedup_p50"]] for r in f])
    try:
        figures["dlib_torch"] = torch_rows(50)
    except ImportError:
        figures["dlib_torch"] = []
    try:
        figures["onnx"] = onnx_rows(50)
    except ImportError:
        figures["onnx"] = []
    figures["gpu_seen"] = bool(found or figures["dlib_torch"] or figures["onnx"])
    print(f"GPU seen: {figures['gpu_seen']} (faiss GPUs: {found})")
    write_results("gpu", figures, command="python benchmarks/gpu.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
