"""What the answer policy costs per request: an ordinary key (decisions, bands, the budget's
read and write in the gallery's database) against a key granted exact scores (no policy, no
budget), through the same in-process service, the same probes, interleaved.

    .venv/bin/python benchmarks/answer_policy.py            # ~1 minute

The service runs on embedded defaults (sealed SQLite, FAISS flat, `xnn`) in process
(`advplugin.cli.api_client.in_process_service`), so the numbers hold the routes, the policy
and SQL but no network. The gallery holds the first lfw-dev photo of every person (4,591);
the probes are the other photos of those with two or more, one per `/identify/templates`
request. The ordinary key's budgets are lifted (the same code path: the counters are read
and written per request; only the refusal never comes). p50 and p99 of each, and the median
of per-pair ratios (one request of each, order alternating), steadier under a changing load.
Writes benchmarks/results/answer_policy.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, ms, table, write_results

from advplugin.cli.api_client import in_process_service
from advplugin.embedding_files import load_embedding_set

REQUESTS = 1500


def main() -> int:
    cache = load_embedding_set(FACE_DATA / "lfw-dev-dlib128.npz")
    order = np.argsort(cache.path, kind="stable")
    first: dict[str, int] = {}
    others: list[int] = []
    for i in order:
        name = str(cache.identity[i])
        if name in first:
            others.append(int(i))
        else:
            first[name] = int(i)
    enrolled = {n: cache.embedding[i] for n, i in first.items()}
    probes = cache.embedding[others[:REQUESTS]]
    times: dict[str, list[float]] = {"exact": [], "policy": []}
    with in_process_service(enrolled) as svc:
        keys = {"exact": svc.key(True, None), "policy": svc.key(False, 10**9)}
        body = {"protection": svc.protection, "prediction_count": 1}
        templates = svc.protector.protect(probes)

        def ask(label: str, t: np.ndarray) -> float:
            start = time.perf_counter()
            r = svc.client.post("/identify/templates", headers={"x-api-key": keys[label]},
                                json={**body, "templates": [t.tolist()]})
            elapsed = time.perf_counter() - start
            assert r.status_code == 200, r.text
            return elapsed

        for t in templates[:50]:  # warm both paths
            ask("exact", t), ask("policy", t)
        for j, t in enumerate(templates):
            pair = ("exact", "policy") if j % 2 == 0 else ("policy", "exact")
            for label in pair:
                times[label].append(ask(label, t))
    ratio = np.array(times["policy"]) / np.array(times["exact"])
    rows = [[label, len(v), f"{ms(v, 50):.2f}", f"{ms(v, 99):.2f}"] for label, v in times.items()]
    table("one probe per /identify/templates request, in process (ms)", ["key", "requests", "p50", "p99"], rows)
    figures = {
        "enrolled": len(enrolled), "requests": len(templates),
        "exact": {"p50_ms": ms(times["exact"], 50), "p99_ms": ms(times["exact"], 99)},
        "policy": {"p50_ms": ms(times["policy"], 50), "p99_ms": ms(times["policy"], 99)},
        "ratio_p50": ms(times["policy"], 50) / ms(times["exact"], 50),
        "paired_ratio_p50": float(np.median(ratio)),
    }
    print(f"policy / exact: p50 ratio {figures['ratio_p50']:.2f}, paired median {figures['paired_ratio_p50']:.2f}")
    write_results("answer_policy", figures, command=".venv/bin/python benchmarks/answer_policy.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
