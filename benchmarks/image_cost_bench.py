"""What one hostile image costs, and what it does to a normal request beside it.

    .venv/bin/python benchmarks/image_cost_bench.py              # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/image_cost_bench.py --baseline   # + the unbounded detector (~15 s more)

1. In process: CPU seconds and peak RSS growth of decoding + extracting the issue's crafted
   image (a 3 KB black 5000x4999 PNG) with the bounded dlib detector, and of a normal LFW
   photo; with --baseline, the crafted image through the unbounded detector as it was.
2. Over HTTP (uvicorn subprocess, SQLite, images mode), with extraction in the serving
   process (EXTRACTION_WORKERS=0) and in worker processes (one per core): the latency of a
   normal /identify alone, and sent 50 ms after a crafted one (is it delayed by more than its
   own time?); and the throughput of 4 clients sending normal /identify requests.
Writes benchmarks/results/image_cost.json.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import FACE_DATA, table, write_results

from advplugin.adapters.dlib_adapter import DlibExtractor
from advplugin.images import load_image
from tests.service.conftest import Server


def crafted_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (5000, 4999)).save(buf, format="PNG")
    return buf.getvalue()


def cpu_cost(extractor: DlibExtractor, data: bytes, repeat: int) -> tuple[float, float]:
    """Median CPU seconds of decode + extract, and the peak RSS growth in MB."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeat):
        t = time.process_time()
        extractor.extract(load_image(data, max_pixels=25_000_000))
        times.append(time.process_time() - t)
    return statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024


def http_figures(face: bytes, crafted: bytes, workers: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), {
            "ADVPLUGIN_DATA_DIR": f"{tmp}/data", "ADVPLUGIN_SCHEME": "xnn",
            "ADVPLUGIN_EXTRACTION_WORKERS": str(workers),
        }).start()
        try:
            with server.client() as c:
                c.post("/enroll", files={"file": ("a.jpg", face)}, data={"subject": "A"})
                for _ in range(3):  # warm every worker
                    c.post("/identify", files={"file": ("a.jpg", face)})
                alone, beside, crafted_s = [], [], []
                for _ in range(rounds):
                    t = time.perf_counter()
                    assert c.post("/identify", files={"file": ("a.jpg", face)}).status_code == 200
                    alone.append(time.perf_counter() - t)

                    def hostile() -> None:
                        t0 = time.perf_counter()
                        with server.client() as c2:
                            c2.post("/identify", files={"file": ("b.png", crafted)})
                        crafted_s.append(time.perf_counter() - t0)

                    th = threading.Thread(target=hostile)
                    th.start()
                    time.sleep(0.05)
                    t = time.perf_counter()
                    assert c.post("/identify", files={"file": ("a.jpg", face)}).status_code == 200
                    beside.append(time.perf_counter() - t)
                    th.join()
            n, clients = 0, 4
            deadline = time.perf_counter() + 10

            def client() -> None:
                nonlocal n
                with server.client() as c3:
                    while time.perf_counter() < deadline:
                        if c3.post("/identify", files={"file": ("a.jpg", face)}).status_code == 200:
                            n += 1

            t = time.perf_counter()
            ths = [threading.Thread(target=client) for _ in range(clients)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            rate = n / (time.perf_counter() - t)
        finally:
            server.stop()
    return {
        "identify_alone_s": statistics.median(alone), "identify_beside_crafted_s": statistics.median(beside),
        "crafted_identify_s": statistics.median(crafted_s), "identify_per_s_4_clients": rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", action="store_true", help="also the unbounded detector (~15 s)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    face = sorted((FACE_DATA / "lfw-dev" / "Aaron_Peirsol").glob("*.jpg"))[0].read_bytes()
    crafted = crafted_png()
    figures: dict[str, object] = {"crafted_png_bytes": len(crafted), "cpu_count": os.cpu_count()}

    bounded = DlibExtractor()
    rows = []
    for name, data in (("normal LFW photo", face), ("crafted 5000x4999 PNG", crafted)):
        cpu, rss = cpu_cost(bounded, data, 3)
        figures[f"bounded/{name}"] = {"cpu_s": cpu, "rss_growth_mb": rss}
        rows.append([name, f"bounded ({bounded.max_detector_pixels} px)", cpu, rss])
    if args.baseline:
        unbounded = DlibExtractor(max_detector_pixels=10**12)
        cpu, rss = cpu_cost(unbounded, crafted, 1)
        figures["unbounded/crafted 5000x4999 PNG"] = {"cpu_s": cpu, "rss_growth_mb": rss}
        rows.append(["crafted 5000x4999 PNG", "unbounded (as before)", cpu, rss])
    table("Decode + extract, in process", ["image", "detector", "CPU s (median)", "peak RSS growth MB"], rows)

    rows = []
    for workers in (0, os.cpu_count() or 1):
        f = http_figures(face, crafted, workers, args.rounds)
        figures[f"http/workers={workers}"] = f
        rows.append([workers, f["identify_alone_s"] * 1000, f["identify_beside_crafted_s"] * 1000,
                     f["crafted_identify_s"] * 1000, f["identify_per_s_4_clients"]])
    table("Over HTTP (medians)", ["extraction workers", "/identify alone ms", "/identify 50 ms after a crafted one ms",
                                  "crafted /identify ms", "/identify per s, 4 clients"], rows)
    write_results("image_cost", figures, command=" ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
