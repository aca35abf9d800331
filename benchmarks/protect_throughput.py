"""Protect throughput per registered scheme: templates/s at 128-d, batch 1 and 1,024, on one
thread and on two (the issue's goals are for 2 cores: `xnn` >= 1M/s, `advface` >= 100k/s).

    .venv/bin/python benchmarks/protect_throughput.py            # ~1 minute
    .venv/bin/python benchmarks/protect_throughput.py --quick    # shorter timings

Why these shapes: batch 1 is the service (one probe per request), batch 1,024 the bulk paths
(migration and re-keying hand chunks to `Protector.protect`). Two threads share ONE
protector, as `advplugin.bulk.pipeline.ParallelProtect` does, with BLAS held to one thread
per call (threadpoolctl) so each thread is one core. The baseline, measured in the same run
with the same threads and batches, is the floor any scheme of this dimension pays: a bare
float32 [B,128] x [128,128] product (`x @ T.T`). The ratio scheme/floor shows how far a
scheme is from that floor, independently of how loaded the shared machine is.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results

from advplugin.keys import Key
from advplugin.protectors import create_protector, list_schemes

DIM = 128
GOALS = {"xnn": 1_000_000.0, "advface": 100_000.0}  # templates/s on 2 cores (issue 14)


def rate(fn: Callable[[np.ndarray], object], batch: np.ndarray, threads: int, seconds: float) -> float:
    """Templates/s of `threads` threads each calling fn(batch) in a loop for `seconds`."""
    fn(batch)  # warm (cached transforms, weights)
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(k: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            fn(batch)
            n += 1
        counts[k] = n

    t0 = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) * len(batch) / (time.perf_counter() - t0)


def profile_one(fn: Callable[[np.ndarray], object], batch: np.ndarray, top: int = 6) -> list[str]:
    """The functions where one scheme spends its time (cProfile, cumulative), for a report."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50 if len(batch) > 1 else 5000):
        fn(batch)
    prof.disable()
    stats = pstats.Stats(prof).sort_stats("tottime")
    out = []
    for (file, line, name), (_, calls, tottime, _cum, _) in list(stats.stats.items()):  # type: ignore[attr-defined]
        out.append((tottime, f"{Path(file).name}:{line}({name}) {calls} calls"))
    out.sort(reverse=True)
    total = sum(t for t, _ in out) or 1.0
    return [f"{t / total:.0%} {what}" for t, what in out[:top]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.5 s per figure instead of 2 s")
    ap.add_argument("--schemes", default=",".join(list_schemes()))
    args = ap.parse_args()
    seconds = 0.5 if args.quick else 2.0
    rng = np.random.default_rng(0)
    key = Key.generate()
    floor_t = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)

    def floor(x: np.ndarray) -> np.ndarray:
        return x @ floor_t.T

    rows, figures = [], {}
    with threadpool_limits(limits=1, user_api="blas"):
        for batch_size in (1, 1024):
            batch = rng.standard_normal((batch_size, DIM)).astype(np.float32)
            for threads in (1, 2):
                base = rate(floor, batch, threads, seconds)
                figures[f"floor/b{batch_size}/t{threads}"] = {"templates_per_s": base}
                for scheme in args.schemes.split(","):
                    p = create_protector(scheme, key=key, dim=DIM)
                    r = rate(p.protect, batch, threads, seconds)
                    goal = GOALS.get(scheme) if (threads == 2 and batch_size == 1024) else None
                    met = None if goal is None else r >= goal
                    figures[f"{scheme}/b{batch_size}/t{threads}"] = {
                        "templates_per_s": r, "floor_templates_per_s": base, "ratio_to_floor": r / base,
                        "goal_templates_per_s": goal, "met": met,
                    }
                    rows.append([scheme, batch_size, threads, r, base, r / base,
                                 "-" if goal is None else f"{goal:.0f}", "-" if met is None else ("met" if met else "NOT met")])
        profiles = {}
        big = rng.standard_normal((1024, DIM)).astype(np.float32)
        for scheme in args.schemes.split(","):
            p = create_protector(scheme, key=key, dim=DIM)
            p.protect(big)
            profiles[scheme] = profile_one(p.protect, big)
    table(
        f"Protect throughput, {DIM}-d ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})",
        ["scheme", "batch", "threads", "templates/s", "floor templates/s", "ratio to floor", "goal (2 threads, batch 1024)", "goal"],
        rows,
    )
    print("\nwhere time goes at batch 1,024 (cProfile, share of own time):")
    for scheme, lines in profiles.items():
        print(f"  {scheme}: " + "; ".join(lines[:4]))
    figures["profiles_b1024"] = profiles
    figures["goals"] = {k: {"templates_per_s": v, "threads": 2, "batch": 1024} for k, v in GOALS.items()}
    write_results("protect_throughput", figures, command="python benchmarks/protect_throughput.py"
                  + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
