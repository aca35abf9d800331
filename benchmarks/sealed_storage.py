"""Sealed storage overhead: sealed vs unsealed galleries, measured in the same run.

    .venv/bin/python benchmarks/sealed_storage.py                 # 100k, SQLite (+ PostgreSQL)
    .venv/bin/python benchmarks/sealed_storage.py --sizes 100000 1000000

For each size, an unsealed and a sealed gallery receive the same synthetic templates
(random unit vectors, 128-d, the xnn output dimension: timing does not depend on their
content) with ONE subject per template, the worst case for sealing (a subject key per row).
Measured per gallery:

* bulk insert rate: `add_templates` in chunks of 50k, what `advplugin migrate` runs per
  transaction (protection itself is unchanged by sealing and left out);
* start-up: `TemplateIndex.load` from the snapshot (what a restart does: read, open, replay)
  and `rebuild` from SQL (what happens without a usable snapshot);
* enrol latency: one template (`add_templates` + index catch-up, as the service does);
* identify latency: `Matcher.identify` of one probe (search + candidate re-scoring, whose
  vectors are read from SQL and so opened per request).

The two galleries are measured in alternation, step by step (each chunk inserted into one
then the other, loads and requests interleaved), so that the load of a shared machine hits
both alike. The sealed gallery has erasure keys (a store file outside the database, as the
service has by default). Writes benchmarks/results/sealed_storage.json; the goal (issue 10): start-up within 1.2x,
enrol and identify unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ms, table, write_results

from advplugin.gallery import Gallery
from advplugin.gallery.backends import IndexConfig
from advplugin.gallery.erasure import ErasureKeyStore
from advplugin.gallery.index import TemplateIndex
from advplugin.gallery.master_keys import LocalKeyProvider
from advplugin.gallery.matcher import Matcher
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize

CHUNK = 50_000
DIM = 128
POSTGRES = os.environ.get("ADVPLUGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, DIM)).astype(np.float32))


class Variant:
    """One gallery (sealed or not) with its index, built with the same rows as the other."""

    def __init__(self, url: str, sealed: bool, n: int, tmp: Path) -> None:
        self.sealed, self.n = sealed, n
        self.protector = create_protector("xnn", key=Key.generate(), dim=DIM)
        master = LocalKeyProvider.from_file(tmp / "master.key", create=True) if sealed else None
        # Sealed as the service seals: with erasure keys in a store outside the database.
        erasure = ErasureKeyStore.open(tmp / f"erasure-{uuid.uuid4().hex[:6]}.db") if sealed else None
        self.g = Gallery.open(url, upgrade=True, master_key=master, erasure=erasure)
        assert self.g.seal_info().sealed == sealed
        self.kw = {"protection": self.protector.metadata, "extractor_name": "dlib", "extractor_version": "bench"}
        self.snap = tmp / f"{'sealed' if sealed else 'plain'}-{n}-{uuid.uuid4().hex[:6]}.npz"
        self.config = IndexConfig(use_gpu=False)
        self.index = TemplateIndex(self.g, DIM, config=self.config, snapshot_path=self.snap)
        self.t: dict[str, list[float]] = {"insert": [], "rebuild": [], "save": [], "load": [], "enrol": [], "identify": []}

    def timed(self, what: str, fn) -> None:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        fn()
        self.t[what].append(time.perf_counter() - t)

    def row(self) -> dict[str, object]:
        t = self.t
        return {
            "templates": self.n, "sealed": self.sealed, "insert_rows_per_s": self.n / sum(t["insert"]),
            "rebuild_from_sql_s": float(np.median(t["rebuild"])), "snapshot_save_s": float(np.median(t["save"])),
            "snapshot_load_s": float(np.median(t["load"])), "snapshot_bytes": self.snap.stat().st_size,
            "enrol_p50_ms": ms(t["enrol"], 50), "enrol_p99_ms": ms(t["enrol"], 99),
            "identify_p50_ms": ms(t["identify"], 50), "identify_p99_ms": ms(t["identify"], 99),
        }


def _load(v: Variant) -> None:
    fresh = TemplateIndex(v.g, DIM, config=v.config, snapshot_path=v.snap)
    assert fresh.load()


def measure(urls: dict[bool, str], n: int, tmp: Path, reps: int) -> list[dict[str, object]]:
    """Both variants measured in alternation, step by step, so that a load spike on a shared
    machine hits both alike."""
    variants = [Variant(urls[s], s, n, tmp) for s in (False, True)]
    rng = np.random.default_rng(n)
    for start in range(0, n, CHUNK):
        v = _unit(rng, min(CHUNK, n - start))
        names = [f"s{i}" for i in range(start, start + len(v))]
        for var in variants:
            var.timed("insert", lambda var=var, names=names, v=v: var.g.add_templates(names, v, **var.kw))
    for var in variants:
        var.timed("rebuild", var.index.rebuild)
        var.timed("save", var.index.save)
    for _ in range(3):
        for var in variants:
            var.timed("load", lambda var=var: _load(var))
    matchers = [Matcher(var.g, var.index, var.protector.score_fn) for var in variants]
    probes = _unit(rng, reps)
    for r in range(reps):
        new = _unit(rng, 1)
        for var, matcher in zip(variants, matchers, strict=True):
            def enrol(var: Variant = var, r: int = r, new: np.ndarray = new) -> None:
                var.g.add_templates([f"new-{r}"], new, **var.kw)
                var.index.catch_up()
            var.timed("enrol", enrol)
            var.timed("identify", lambda m=matcher, r=r: m.identify(probes[r : r + 1], k=1))
    rows = [var.row() for var in variants]
    for var in variants:
        var.g.close()
    return rows


def _pg_database() -> tuple[str, callable] | None:  # type: ignore[valid-type]
    try:
        admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        name = f"advplugin_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as e:  # no server: PostgreSQL rows are skipped, said so
        print(f"PostgreSQL skipped: {type(e).__name__}")
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return sa.engine.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False), drop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--postgres-size", type=int, default=100_000, help="0: no PostgreSQL rows")
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    faiss.omp_set_num_threads(1)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in args.sizes:
            urls = {s: f"sqlite:///{tmp / f'{s}-{n}.db'}" for s in (False, True)}
            rows.extend({"backend": "sqlite", **r} for r in measure(urls, n, tmp, args.reps))
            print(f"sqlite {n} done", flush=True)
        if args.postgres_size:
            pgs = [_pg_database() for _ in (False, True)]
            if all(pgs):
                try:
                    urls = {s: pg[0] for s, pg in zip((False, True), pgs, strict=True)}  # type: ignore[index]
                    rows.extend({"backend": "postgresql", **r} for r in measure(urls, args.postgres_size, tmp, args.reps))
                finally:
                    for pg in pgs:
                        pg[1]()  # type: ignore[index]
                print(f"postgresql {args.postgres_size} done", flush=True)
    ratios = []
    for r in rows:
        if r["sealed"]:
            base = next(b for b in rows if not b["sealed"] and b["backend"] == r["backend"]
                        and b["templates"] == r["templates"])
            ratios.append({
                "backend": r["backend"], "templates": r["templates"],
                **{k: float(r[k]) / float(base[k]) for k in (
                    "insert_rows_per_s", "rebuild_from_sql_s", "snapshot_load_s", "enrol_p50_ms",
                    "identify_p50_ms")},
            })
    table(
        "Sealed vs unsealed gallery (same run; 1 subject per template; 1 FAISS thread)",
        ["backend", "templates", "sealed", "insert rows/s", "snapshot load s", "rebuild from SQL s",
         "enrol p50 ms", "enrol p99 ms", "identify p50 ms", "identify p99 ms"],
        [[r["backend"], r["templates"], r["sealed"], round(float(r["insert_rows_per_s"])),
          r["snapshot_load_s"], r["rebuild_from_sql_s"], r["enrol_p50_ms"], r["enrol_p99_ms"],
          r["identify_p50_ms"], r["identify_p99_ms"]] for r in rows],
    )
    table(
        "Ratios sealed / unsealed (goal: load <= 1.2, enrol and identify ~1; insert rate: higher is better)",
        ["backend", "templates", "insert rate", "snapshot load", "rebuild from SQL", "enrol p50", "identify p50"],
        [[r["backend"], r["templates"], r["insert_rows_per_s"], r["snapshot_load_s"], r["rebuild_from_sql_s"],
          r["enrol_p50_ms"], r["identify_p50_ms"]] for r in ratios],
    )
    write_results("sealed_storage", {"goal": {"snapshot_load_ratio": 1.2}, "rows": rows, "ratios": ratios},
                  command="python benchmarks/sealed_storage.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
