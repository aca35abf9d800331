"""dlib's face ResNet vs its torch port (`dlib-torch`): same chips, same run, same machine.

    .venv/bin/python benchmarks/dlib_torch.py                # 512 lfw-dev faces
    .venv/bin/python benchmarks/dlib_torch.py --faces 128    # quicker

Faces: lfw-dev photos in sorted order, one face each (the one nearest the centre, as
`advplugin embed` picks it), detected and cut into 150 x 150 chips once by the `dlib-torch`
extractor (dlib's own detector, landmarks and get_face_chips). Then both networks embed the
same chips:
- dlib: `face_recognition_model_v1.compute_face_descriptor`, one chip per call (batch 1) and
  lists of 64 chips (its batch API);
- torch: `ChipEmbedder` with batch sizes 1 and 64, on one thread (dlib's network runs on one
  core: its CPU time per face is about its wall time) and on all cores.
Also reported: the largest |difference| between the two networks' descriptors over all the
faces (the tests assert < 1e-4 on >= 500 faces through `advplugin embed`).
Throughput depends on the machine and its load: compare the speed-ups, not the absolutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, table, write_results

from advplugin.adapters import create_extractor
from advplugin.adapters.dlib_adapter import resnet_model_path
from advplugin.images import load_image


def face_chips(n: int) -> np.ndarray:
    extractor = create_extractor("dlib-torch")
    paths = sorted((FACE_DATA / "lfw-dev").glob("*/*.jpg"))
    chips: list[np.ndarray] = []
    for path in paths:
        if len(chips) == n:
            break
        image = load_image(path)
        found = extractor.detect(image).nearest_centre(*image.shape[:2])
        if len(found):
            chips.append(extractor.chips(image, found)[0])  # type: ignore[attr-defined]
    return np.stack(chips)


def timed(
    fn: Callable[[np.ndarray], np.ndarray], chips: np.ndarray
) -> tuple[np.ndarray, float, float]:
    fn(chips[:2])  # warm-up: lazy allocations and kernel selection
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(chips)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=512)
    args = parser.parse_args()

    import dlib
    import torch

    from advplugin.nets.dlib_resnet import ChipEmbedder

    chips = face_chips(args.faces)
    net = dlib.face_recognition_model_v1(str(resnet_model_path()))

    def dlib_batches(size: int) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            out = []
            for start in range(0, len(x), size):
                part = list(x[start : start + size])
                if size == 1:
                    out.append(np.asarray(net.compute_face_descriptor(part[0])))
                else:
                    out.extend(np.asarray(v) for v in net.compute_face_descriptor(part))
            return np.asarray(out, np.float32).reshape(len(x), 128)

        return run

    cores = os.cpu_count() or 1
    runs: list[tuple[str, int, int, Callable[[np.ndarray], np.ndarray]]] = [
        ("dlib", 1, 1, dlib_batches(1)),
        ("dlib", 64, 1, dlib_batches(64)),
    ]
    for threads in sorted({1, cores}):
        for size in (1, 64):
            runs.append(
                ("dlib-torch", size, threads, ChipEmbedder(resnet_model_path(), batch_size=size))
            )
    rows, figures, outputs = [], {"faces": len(chips), "runs": []}, {}
    base: dict[int, float] = {}
    for name, size, threads, fn in runs:
        torch.set_num_threads(threads)
        out, wall, cpu = timed(fn, chips)
        outputs[name] = out
        rate = len(chips) / wall
        if name == "dlib":
            base[size] = rate
        speedup = rate / base[size]
        figures["runs"].append(  # type: ignore[union-attr]
            {
                "network": name,
                "batch": size,
                "torch_threads": threads if name != "dlib" else None,
                "faces_per_s": rate,
                "wall_s": wall,
                "cpu_s": cpu,
                "speedup_vs_dlib_same_batch": speedup,
            }
        )
        label = f"{threads}" if name != "dlib" else "(dlib's own)"
        rows.append(
            [name, size, label, f"{rate:.1f}", f"{wall:.2f}", f"{cpu:.2f}", f"{speedup:.2f}x"]
        )
    diff = float(np.abs(outputs["dlib-torch"] - outputs["dlib"]).max())
    figures["max_abs_diff"] = diff
    table(
        f"dlib vs dlib-torch on {len(chips)} lfw-dev face chips (150 x 150)",
        [
            "network",
            "batch",
            "torch threads",
            "faces/s",
            "wall s",
            "CPU ms/face",
            "vs dlib, same batch",
        ],
        rows,
    )
    print(f"\nmax |dlib-torch - dlib| over {len(chips)} faces: {diff:.2e}")
    write_results("dlib_torch", figures, command=" ".join(["python", *sys.argv]))
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
