"""Identification at the cost of the search: `Matcher.identify` vs a bare FAISS search.

    .venv/bin/python benchmarks/identify_overhead.py            # 10k and 100k (~2 minutes)
    .venv/bin/python benchmarks/identify_overhead.py --full     # + 1M (~10 minutes, ~4 GB)

Same vectors, same index kind (flat inner product), same number of candidates (the matcher's
50), one OpenMP thread as the service uses, in the same run: the baseline is a plain
`faiss.IndexFlatIP` holding the protected templates; the protected path is what the service
runs per request (`TemplateIndex` on an SQLite gallery + `Matcher.identify`: names, best
template per subject, threshold). Galleries are the lfw-dev templates plus distractors made
from them (template + Gaussian noise, renormalised), so neighbours are realistic. Batches of
1 and 64 probes; p50 and p99 of interleaved repetitions (the order alternating), and the median of
each repetition's own ratio (`paired_ratio_p50`), steadier under a changing load. Writes
benchmarks/results/identify_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, ms, table, write_results

from advplugin.embedding_files import load_embedding_set
from advplugin.gallery import Gallery
from advplugin.gallery.backends import IndexConfig
from advplugin.gallery.index import IndexFollower, TemplateIndex
from advplugin.gallery.matcher import DEFAULT_CANDIDATES, Matcher
from advplugin.keys import Key
from advplugin.protectors import Protector, create_protector
from advplugin.protectors.base import l2_normalize

CHUNK = 50_000


def gallery_vectors(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= len(base):
        return base[:n]
    src = base[rng.integers(0, len(base), n - len(base))]
    noise = rng.normal(scale=0.35 / np.sqrt(base.shape[1]), size=src.shape).astype(np.float32)
    return l2_normalize(np.concatenate([base, l2_normalize(src + noise)]))


def measure(
    n: int, protector: Protector, base: np.ndarray, names: np.ndarray, probes: np.ndarray, tmp: Path, reps: int
) -> list[dict]:
    """`base`: protected lfw-dev templates; `probes`: protected probes, same key."""
    rng = np.random.default_rng(n)
    vectors = gallery_vectors(base, n, rng)
    subjects = [str(names[i % len(names)]) if i < len(names) else f"distractor-{i}" for i in range(n)]
    g = Gallery.open(f"sqlite:///{tmp / f'g{n}.db'}", upgrade=True)
    for i in range(0, n, CHUNK):
        g.add_templates(subjects[i : i + CHUNK], vectors[i : i + CHUNK], protection=protector.metadata,
                        extractor_name="dlib", extractor_version="bench")  # fmt: skip
    index = TemplateIndex(g, base.shape[1], config=IndexConfig(use_gpu=False))
    index.rebuild()
    # As the service runs it: the change log is followed off the request path.
    follower = IndexFollower(g, index.config.sync_interval)
    follower.add(index)
    matcher = Matcher(g, index, protector.score_fn)  # as the service builds it
    bare = faiss.IndexFlatIP(base.shape[1])
    bare.add(vectors)
    rows = []
    for batch in (1, 64):
        # About the same wall time per cell: a 1M batch-64 search takes seconds.
        n_reps = max(40, min(reps, int(reps * 20_000 / (n * batch) ** 0.75))) if n * batch > 20_000 else reps
        t_bare: list[float] = []
        t_match: list[float] = []

        def timed(f, q, out: list[float]) -> None:  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            f(q)
            out.append(time.perf_counter() - t)

        def run_bare(q: np.ndarray) -> None:
            bare.search(l2_normalize(q), DEFAULT_CANDIDATES)

        def run_match(q: np.ndarray) -> None:
            matcher.identify(q, k=1)

        for r in range(n_reps):
            q = probes[(r * batch) % (len(probes) - batch) :][:batch]
            # Alternate which goes first (A B, B A, ...): on a shared machine the second of a
            # pair finds caches and the scheduler in another state than the first.
            pair = [(run_bare, t_bare), (run_match, t_match)]
            for f, out in pair if r % 2 == 0 else pair[::-1]:
                timed(f, q, out)
        paired = np.asarray(t_match) / np.asarray(t_bare)
        rows.append({
            "templates": n, "batch": batch, "repetitions": n_reps,
            "bare_p50_ms": ms(t_bare, 50), "bare_p99_ms": ms(t_bare, 99),
            "identify_p50_ms": ms(t_match, 50), "identify_p99_ms": ms(t_match, 99),
            "ratio_p50": ms(t_match, 50) / ms(t_bare, 50), "ratio_p99": ms(t_match, 99) / ms(t_bare, 99),
            # Median of each repetition's own ratio (its two searches back to back): less
            # sensitive to the machine's load changing during the run than the ratio of p50s.
            "paired_ratio_p50": float(np.median(paired)),
        })
    follower.close()
    g.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also 1M templates")
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    faiss.omp_set_num_threads(1)
    cache = load_embedding_set(FACE_DATA / "lfw-dev-dlib128.npz")
    protector = create_protector("xnn", key=Key.generate(), dim=cache.embedding.shape[1])
    rng = np.random.default_rng(0)
    rows = rng.choice(len(cache.embedding), 512, replace=False)
    jitter = rng.normal(scale=0.01, size=(512, cache.embedding.shape[1])).astype(np.float32)
    probes = protector.protect(cache.embedding[rows] + jitter)
    base = protector.protect(cache.embedding)
    sizes = [10_000, 100_000] + ([1_000_000] if args.full else [])
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            results.extend(measure(n, protector, base, cache.identity, probes, Path(d), args.reps))
            print(f"{n} templates done", flush=True)
    table(
        "Matcher.identify vs bare FAISS search (flat IP, same vectors, 50 candidates, 1 thread)",
        ["templates", "batch", "reps", "bare p50 ms", "identify p50 ms", "ratio p50", "paired ratio p50",
         "bare p99 ms", "identify p99 ms", "ratio p99"],
        [[r["templates"], r["batch"], r["repetitions"], r["bare_p50_ms"], r["identify_p50_ms"], r["ratio_p50"],
          r["paired_ratio_p50"], r["bare_p99_ms"], r["identify_p99_ms"], r["ratio_p99"]] for r in results],
    )
    write_results("identify_overhead", {"goal_ratio": 1.1, "rows": results},
                  command="python benchmarks/identify_overhead.py" + (" --full" if args.full else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
