"""Gallery benchmark: one command, prints tables, writes benchmarks/results/service_bench.json.

    .venv/bin/python benchmarks/service_bench.py            # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/service_bench.py --quick    # smaller sizes

HTTP figures (image and template endpoints under 1-8 concurrent clients, latency against
bare extraction) are `benchmarks/http_load.py`'s; `start_server` stays here for blind.py.

1. Protected search (Matcher: FAISS + protector re-scoring + SQL names) vs raw FAISS search
   of raw embeddings, same gallery (all lfw-dev images), same queries: the ratio.
2. Gallery size vs search latency and index memory for flat/IVF/HNSW, with recall@1 of
   IVF/HNSW against exact search. Large galleries are LFW templates plus distractors made
   from them (template + Gaussian noise, renormalised), so neighbours are realistic.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import httpx
import numpy as np

from advplugin.embedding_files import load_embedding_set
from advplugin.gallery import Gallery
from advplugin.gallery.backends import IndexConfig, create_index_backend
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.matcher import Matcher
from advplugin.keys import write_key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, table, write_results
from common import ms as pct


def first_vs_rest(identity: np.ndarray, path: np.ndarray) -> tuple[list[int], list[int]]:
    order = np.argsort(path, kind="stable")
    by_id: dict[str, list[int]] = {}
    for i in order:
        by_id.setdefault(str(identity[i]), []).append(int(i))
    g, p = [], []
    for n in sorted(by_id):
        if len(by_id[n]) >= 2:
            g.append(by_id[n][0])
            p.extend(by_id[n][1:])
    return g, p


def start_server(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "advplugin.service", "--port", str(port), "--log-level", "warning"],
        cwd=workdir, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def timed(fn, items) -> list[float]:
    out = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        out.append(time.perf_counter() - t)
    return out


def bench_protected_vs_raw(tmp: Path, cache) -> dict[str, float]:
    key_path = tmp / "key2"
    protector = create_protector("xnn", key=write_key(key_path), dim=128)
    g = Gallery.open(f"sqlite:///{tmp / 'bench.db'}", upgrade=True)
    templates = protector.protect(cache.embedding)
    g.add_templates([str(s) for s in cache.identity], templates, protection=protector.metadata,
                    extractor_name="dlib", extractor_version="cache")
    index = TemplateIndex(g, 128, config=IndexConfig())  # the service's defaults
    index.load()
    matcher = Matcher(g, index, protector.score_fn)  # as the service builds it
    raw = faiss.IndexFlatIP(128)
    raw.add(l2_normalize(cache.embedding))
    rng = np.random.default_rng(0)
    q = rng.choice(len(cache.embedding), 300, replace=False)
    raw_q, prot_q = l2_normalize(cache.embedding[q]), templates[q]
    t_raw = timed(lambda i: raw.search(raw_q[i : i + 1], 1), range(len(q)))
    t_idx = timed(lambda i: index.search(prot_q[i : i + 1], 1), range(len(q)))
    t_match = timed(lambda i: matcher.identify(prot_q[i : i + 1], k=1), range(len(q)))
    same = float(np.mean(raw.search(raw_q, 1)[1][:, 0] == index.search(prot_q, 1)[1][:, 0] - 1))
    r = pct(t_raw, 50)
    table(
        f"Protected vs raw search ({len(templates)} lfw-dev templates, 1 query at a time)",
        ["search", "p50 ms", "ratio to raw FAISS"],
        [
            ["raw FAISS IndexFlatIP on raw embeddings (baseline)", r, 1.0],
            ["protected TemplateIndex.search (FAISS on templates)", pct(t_idx, 50), pct(t_idx, 50) / r],
            ["protected Matcher.identify (+ names, best per subject)", pct(t_match, 50), pct(t_match, 50) / r],
        ],
    )
    print(f"\ntop-1 neighbour identical for raw and protected search: {same:.2%} of queries")
    g.close()
    return {"templates": len(templates), "raw_faiss_p50_ms": r, "index_search_p50_ms": pct(t_idx, 50),
            "matcher_identify_p50_ms": pct(t_match, 50), "identify_ratio_p50": pct(t_match, 50) / r,
            "top1_identical_share": same}


def bench_scaling(cache, sizes: list[int], hnsw_sizes: list[int]) -> dict[str, list]:
    protector = create_protector("xnn", key=load_key_or_new(), dim=128)
    base = protector.protect(cache.embedding)
    g_idx, p_idx = first_vs_rest(cache.identity, cache.path)
    queries = l2_normalize(protector.protect(cache.embedding[p_idx[:300]]))
    rng = np.random.default_rng(1)
    rows, recall_rows = [], []
    for n in sizes:
        extra = n - len(g_idx)
        src = base[rng.integers(0, len(base), extra)]
        noise = rng.normal(scale=0.35 / np.sqrt(128), size=src.shape).astype(np.float32)
        gallery = l2_normalize(np.concatenate([base[g_idx], l2_normalize(src + noise)]))
        ids = np.arange(len(gallery), dtype=np.int64)
        # Chunks as TemplateIndex.rebuild reads SQL: IVF trains on the first ones, as served.
        chunks = [(ids[i : i + 20_000], gallery[i : i + 20_000]) for i in range(0, n, 20_000)]
        exact = None
        for name in ("faiss-flat", "faiss-ivf", "faiss-hnsw"):
            if name == "faiss-hnsw" and n not in hnsw_sizes:
                continue
            nlist = int(min(4 * np.sqrt(n), 1024))
            cfg = IndexConfig(
                backend=name, ivf_nlist=nlist, ivf_nprobe=16, hnsw_m=32, hnsw_ef_search=128, use_gpu=False
            )
            kind = cfg.kind
            t = time.perf_counter()
            index = create_index_backend(name, dim=128, config=cfg)
            index.rebuild(chunks, n_expected=n)
            build = time.perf_counter() - t
            lat = timed(lambda i, index=index: index.search(queries[i : i + 1], 10), range(100))
            top1 = index.search(queries, 1)[1][:, 0]
            if kind == "flat":
                exact = top1
            recall = float(np.mean(top1 == exact))
            mem = len(index.serialize()) / 2**20
            rows.append([kind, n, build, pct(lat, 50), pct(lat, 95), mem])
            if kind != "flat":
                recall_rows.append([kind, n, f"nlist={nlist}, nprobe=16" if kind == "ivf" else "M=32, efSearch=128",
                                    recall])
            del index
    table("Gallery size vs search latency (top-10, 1 query) and index memory",
          ["index", "templates", "build s", "p50 ms", "p95 ms", "memory MiB"], rows)
    table("Recall@1 of approximate indexes against exact search (300 lfw-dev probes)",
          ["index", "templates", "parameters", "recall@1 vs flat"], recall_rows)
    return {
        "latency": [dict(zip(["index", "templates", "build_s", "p50_ms", "p95_ms", "memory_mib"], r, strict=True))
                    for r in rows],
        "recall": [dict(zip(["index", "templates", "parameters", "recall_at_1_vs_flat"], r, strict=True))
                   for r in recall_rows],
    }


def load_key_or_new():
    from advplugin.keys import Key

    return Key.generate()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    cache = load_embedding_set(FACE_DATA / "lfw-dev-dlib128.npz")
    # One OpenMP thread, as the service uses (Settings.search_threads), for baseline and
    # protected alike: single-query searches lose badly to OpenMP spin-waiting on busy cores.
    faiss.omp_set_num_threads(1)
    print(f"# advplugin service benchmark ({os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}, faiss {faiss.__version__}, 1 search thread, "
          f"{faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0} GPUs)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        figures: dict[str, object] = {"protected_vs_raw": bench_protected_vs_raw(tmp, cache)}
    if args.quick:
        figures["scaling"] = bench_scaling(cache, [10_000, 100_000], [10_000])
    else:
        figures["scaling"] = bench_scaling(cache, [10_000, 50_000, 100_000, 1_000_000], [10_000, 50_000])
    write_results("service_bench", figures, command="python benchmarks/service_bench.py" + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
