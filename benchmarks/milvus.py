"""The milvus backend beside FAISS: recall@1 against exact search, search latency, start-up.

    .venv/bin/python benchmarks/milvus.py              # 10k and 100k (~5-10 minutes on 2 cores)
    .venv/bin/python benchmarks/milvus.py --sizes 10000 --reps 50    # a quick look
    .venv/bin/python benchmarks/milvus.py --uri http://milvus:19530  # against a Milvus server

Same vectors, same queries, same run. Galleries are protected lfw-dev templates (xnn) plus
distractors made from them (as benchmarks/identify_overhead.py makes them); queries are
protected lfw-dev embeddings with a little noise. Engines:
- `faiss-flat`: exact inner product, the ground truth of recall@1 (one OpenMP thread, as the
  service searches);
- `faiss-hnsw`: the project's faiss-hnsw defaults (M 32, efSearch 128);
- `milvus-flat`, `milvus-hnsw`: the `milvus` backend (what the service calls) on milvus-lite,
  FLAT and HNSW (M 32, ef 128), after a flush and after milvus-lite's background builder has
  really built the index of every segment (its describe_index says "Finished" before that,
  and also when a build failed: see docs/milvus.md).
Batch-1 latency p50/p95 over interleaved repetitions; recall@1 (top-1 = exact top-1) over 256
probes and over 256 hard queries (a template plus heavy noise: many close competitors).

Start-up at the largest size, the reason the backend is `persistent`: re-uploading the
collection (`rebuild`, what a backend without a usable snapshot does) against reconnecting
from the snapshot handle in a NEW process (milvus-lite reopens its folder, loads the
collection, answers one search). Memory: the process's resident set after each engine is
filled (milvus-lite) or the serialised index size (FAISS), and milvus-lite's folder on disk
(both collections of a size). Writes benchmarks/results/milvus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, ms, table, write_results
from identify_overhead import gallery_vectors

from advplugin.embedding_files import load_embedding_set
from advplugin.gallery.backends import IndexConfig
from advplugin.gallery.backends.milvus_backend import MilvusBackend, is_lite
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize

K = 50  # the matcher's candidates per probe
CHUNK = 20_000  # rows per batch of a rebuild, as TemplateIndex reads SQL
HNSW = {"M": 32, "efConstruction": 40}  # FAISS's default efConstruction, for both engines
EF = 128


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def lite_index_built(uri: str, collection: str) -> bool:
    """Whether milvus-lite (running in THIS process) has attached a vector index to every
    sealed segment. Private milvus-lite internals, used only here: its API cannot tell."""
    from milvus_lite.server_manager import server_manager_instance

    _, db, _ = server_manager_instance._servers[os.path.abspath(uri)]
    col = db.get_collection(collection)
    col._wait_for_bg()
    return all("vector" in seg.indexes for seg in col._segments_snapshot() if seg.num_rows)


def timed_search(search, probes: np.ndarray, reps: int) -> list[float]:
    out = []
    for r in range(reps):
        q = probes[r % len(probes)][None]
        t = time.perf_counter()
        search(q)
        out.append(time.perf_counter() - t)
    return out


def milvus_backend(uri: str, namespace: str, index_type: str) -> MilvusBackend:
    params = HNSW if index_type == "HNSW" else {}
    config = IndexConfig(
        backend="milvus", milvus_uri=uri, milvus_index_type=index_type, milvus_index_params=params,
        milvus_search_params={"ef": EF} if index_type == "HNSW" else {},
    )
    b = MilvusBackend(dim=128, config=config)
    b.bind(lambda: namespace)
    return b


def measure(n: int, base: np.ndarray, probes: np.ndarray, uri: str, reps: int) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(n)
    vectors = gallery_vectors(base, n, rng)
    ids = np.arange(1, n + 1, dtype=np.int64)
    # Two query sets for recall: the probes (a little noise: the same image again), and hard
    # ones, far enough from any template that many neighbours compete for the top place.
    hard = base[rng.integers(0, len(base), 256)]
    hard = l2_normalize(hard + rng.normal(scale=0.8 / np.sqrt(128), size=hard.shape).astype(np.float32))
    recall_sets = {"recall_at_1_vs_exact": probes[:256], "recall_at_1_vs_exact_hard": hard}
    rows: list[dict] = []
    extra: dict = {}

    flat = faiss.IndexFlatIP(128)
    flat.add(vectors)
    exact_ids = {name: ids[flat.search(q, 1)[1][:, 0]] for name, q in recall_sets.items()}
    engines: dict[str, object] = {"faiss-flat": flat}
    extra["faiss_flat_index_mb"] = faiss.serialize_index(flat).nbytes / 2**20

    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(128, HNSW["M"], faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = EF
    hnsw.add(vectors)
    extra["faiss_hnsw_build_s"] = time.perf_counter() - t
    extra["faiss_hnsw_index_mb"] = faiss.serialize_index(hnsw).nbytes / 2**20
    engines["faiss-hnsw"] = hnsw

    for index_type in ("FLAT", "HNSW"):
        b = milvus_backend(uri, f"bench_{n}_{index_type.lower()}", index_type)
        rss0 = rss_mb()
        t = time.perf_counter()
        b.rebuild(((ids[s : s + CHUNK], vectors[s : s + CHUNK]) for s in range(0, n, CHUNK)), n_expected=n)
        extra[f"milvus_{index_type.lower()}_rebuild_s"] = time.perf_counter() - t
        if is_lite(uri):  # a server's describe_index can be trusted; milvus-lite's cannot
            t = time.perf_counter()
            collection = b._client.describe_alias(b.alias)["collection_name"]
            extra[f"milvus_{index_type.lower()}_index_built"] = lite_index_built(uri, collection)
            extra[f"milvus_{index_type.lower()}_index_wait_s"] = time.perf_counter() - t
        extra[f"milvus_{index_type.lower()}_rss_mb"] = rss_mb() - rss0
        engines[f"milvus-{index_type.lower()}"] = b
    if is_lite(uri):
        extra["milvus_lite_folder_mb"] = folder_mb(Path(uri))

    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(reps):  # interleaved: a load spike hits every engine alike
        for name, engine in engines.items():
            times[name] += timed_search(lambda q, e=engine: e.search(q, K), probes[r : r + 1], 1)
    for name, engine in engines.items():
        recall = {}
        for set_name, q in recall_sets.items():
            found = engine.search(q, 1)[1][:, 0]  # type: ignore[attr-defined]
            top1 = found if isinstance(engine, MilvusBackend) else ids[found]
            recall[set_name] = float(np.mean(top1 == exact_ids[set_name]))
        rows.append({
            "templates": n, "engine": name, "repetitions": reps, "k": K, **recall,
            "p50_ms": ms(times[name], 50), "p95_ms": ms(times[name], 95),
            "p50_vs_faiss_flat": ms(times[name], 50) / ms(times["faiss-flat"], 50),
        })
    return rows, extra


def startup(n: int, base: np.ndarray, probes: np.ndarray, uri: str) -> dict:
    """Rebuild (re-upload) vs reconnect-by-handle in a fresh process, at n templates."""
    vectors = gallery_vectors(base, n, np.random.default_rng(n))
    ids = np.arange(1, n + 1, dtype=np.int64)
    b = milvus_backend(uri, f"startup_{n}", "FLAT")
    t = time.perf_counter()
    b.rebuild(((ids[s : s + CHUNK], vectors[s : s + CHUNK]) for s in range(0, n, CHUNK)), n_expected=n)
    rebuild_s = time.perf_counter() - t
    handle = b.serialize().decode()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(128))
    flat.add_with_ids(vectors, ids)
    blob = faiss.serialize_index(flat)
    t = time.perf_counter()
    faiss.deserialize_index(blob)
    faiss_load_s = time.perf_counter() - t
    if is_lite(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)  # one process per milvus-lite folder
    child = f"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from advplugin.gallery.backends import IndexConfig
from advplugin.gallery.backends.milvus_backend import MilvusBackend
t1 = time.perf_counter()
b = MilvusBackend.deserialize({handle!r}.encode(), dim=128, config=IndexConfig(backend="milvus", milvus_uri={uri!r}))
size = b.size
b.search(np.array({probes[0].tolist()!r}, np.float32)[None], {K})
t2 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "reconnect_and_first_search_s": t2 - t1, "size": size}}))
"""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - t
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["size"] == n, got
    return {
        "templates": n, "milvus_rebuild_s": rebuild_s,
        "milvus_reconnect_s": got["reconnect_and_first_search_s"], "milvus_reconnect_imports_s": got["imports_s"],
        "milvus_reconnect_process_s": process_s, "faiss_flat_snapshot_load_s": faiss_load_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--uri", help="a Milvus server (http://host:19530) instead of milvus-lite folders")
    args = p.parse_args()
    faiss.omp_set_num_threads(1)
    cache = load_embedding_set(FACE_DATA / "lfw-dev-dlib128.npz")
    protector = create_protector("xnn", key=Key.generate(), dim=cache.embedding.shape[1])
    rng = np.random.default_rng(0)
    rows_i = rng.choice(len(cache.embedding), 512, replace=False)
    jitter = rng.normal(scale=0.01, size=(512, cache.embedding.shape[1])).astype(np.float32)
    probes = l2_normalize(protector.protect(cache.embedding[rows_i] + jitter))
    base = l2_normalize(protector.protect(cache.embedding))
    rows: list[dict] = []
    builds: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            r, extra = measure(n, base, probes, args.uri or str(Path(d) / f"bench-{n}.db"), args.reps)
            rows += r
            builds[str(n)] = extra
            print(f"{n} templates done", flush=True)
        start = startup(max(args.sizes), base, probes, args.uri or str(Path(d) / "startup.db"))
    table(
        "Search: milvus backend (milvus-lite) beside FAISS, batch 1, k=50, same vectors and queries",
        ["templates", "engine", "recall@1 vs exact", "hard queries", "p50 ms", "p95 ms", "p50 / faiss-flat"],
        [[r["templates"], r["engine"], r["recall_at_1_vs_exact"], r["recall_at_1_vs_exact_hard"], r["p50_ms"],
          r["p95_ms"], r["p50_vs_faiss_flat"]] for r in rows],
    )
    table("Build and memory", ["templates", "figure", "value"],
          [[n, k, v] for n, extra in builds.items() for k, v in extra.items()])
    table("Start-up at the largest size", ["figure", "value"], [[k, v] for k, v in start.items()])
    versions = {}
    for pkg in ("pymilvus", "milvus-lite"):
        from importlib import metadata

        versions[pkg] = metadata.version(pkg)
    write_results(
        "milvus", {"rows": rows, "builds": builds, "startup": start, "milvus_versions": versions,
                   "k": K, "hnsw": {**HNSW, "ef_search": EF}},
        command="python benchmarks/milvus.py" + (f" --sizes {' '.join(map(str, args.sizes))}"
                                                 if args.sizes != [10_000, 100_000] else "")
        + (f" --reps {args.reps}" if args.reps != 100 else "") + (" --uri <server>" if args.uri else ""),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
