"""Migration vs a plain bulk load of the same raw rows, same database kind, same run.

    .venv/bin/python benchmarks/migration_throughput.py                 # 200,000 rows, ~2 min
    .venv/bin/python benchmarks/migration_throughput.py --quick         # 50,000 rows
    .venv/bin/python benchmarks/migration_throughput.py --unsealed      # plaintext gallery
    .venv/bin/python benchmarks/migration_throughput.py --profile       # + cProfile of one run

Per database kind (SQLite, PostgreSQL):

1. Baseline: a plain bulk load of the raw rows (id, subject, float32 bytes) into a fresh
   table, the fastest ordinary way that database offers: COPY on PostgreSQL, one
   `executemany` in one transaction on SQLite. Only the writes are timed (rows are made in
   chunks beforehand so the generator costs neither side). That table is then the source.
2. `advplugin.bulk.pipeline.migrate` from that table (`SqlTableSource`) into a fresh gallery
   in another database of the same kind: read, protect (`xnn`, 128-d) on all cores, seal
   (AES-GCM per row; the default gallery is sealed and has an erasure key store, as
   `advplugin migrate` opens it; `--unsealed` for plaintext) and write
   the chunk, its change-log and checkpoint in one transaction. It runs in a child process
   whose peak resident memory (VmHWM, sampled) shows whether streaming bounds memory. Its
   SQL time is recorded per statement (COPY included), beside the total.

3. The same reading, protecting and sealing with no writes at all (`dry_child`): plain load
   s / its time is the most the ratio could be if every gallery write were free.

ratio = migration rows/s / plain load rows/s (goal >= 0.9). Writes
benchmarks/results/migration_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results

DEFAULT_PG = os.environ.get(
    "ADVPLUGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
GOAL = 0.9
DIM = 128
SOURCE_TABLE = "faces"


def raw_chunks(rows: int, chunk: int) -> Iterator[tuple[list[int], list[str], list[bytes]]]:
    """The raw rows, deterministic, chunk by chunk: ids 1..rows, 5 rows per subject."""
    rng = np.random.default_rng(0)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        vecs = rng.standard_normal((stop - start, DIM), dtype=np.float32)
        ids = list(range(start + 1, stop + 1))
        yield ids, [f"person{i // 5:07d}" for i in ids], [v.tobytes() for v in vecs]


def plain_load(url: str, rows: int, chunk: int) -> float:
    """Seconds spent writing the raw rows into a fresh `faces` table (the baseline)."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    faces = sa.Table(
        SOURCE_TABLE, meta,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("person", sa.String(255), nullable=False),
        sa.Column("vec", sa.LargeBinary, nullable=True),
    )  # fmt: skip
    meta.create_all(engine)
    spent = 0.0
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                with raw.cursor() as cur, cur.copy(f"COPY {SOURCE_TABLE} (id, person, vec) FROM STDIN") as cp:
                    for ids, subjects, blobs in raw_chunks(rows, chunk):
                        t = time.perf_counter()
                        for row in zip(ids, subjects, blobs, strict=True):
                            cp.write_row(row)
                        spent += time.perf_counter() - t
                t = time.perf_counter()
                raw.commit()
                spent += time.perf_counter() - t
        else:
            with engine.connect() as conn:
                t = time.perf_counter()
                with conn.begin():
                    spent += time.perf_counter() - t
                    for ids, subjects, blobs in raw_chunks(rows, chunk):
                        params = [{"id": i, "person": s, "vec": b} for i, s, b in zip(ids, subjects, blobs, strict=True)]
                        t = time.perf_counter()
                        conn.execute(faces.insert(), params)
                        spent += time.perf_counter() - t
                    t = time.perf_counter()
                spent += time.perf_counter() - t  # the commit
    finally:
        engine.dispose()
    return spent


def _source_and_protector(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The source table and a fresh `xnn` protector, as both child runs open them."""
    from advplugin.bulk import open_source
    from advplugin.keys import Key
    from advplugin.protectors import create_protector

    source = open_source(args.source_url, table=SOURCE_TABLE, id_column="id", subject_column="person",
                         vector_column="vec")
    return source, create_protector("xnn", key=Key.generate(), dim=DIM)


def child(args: argparse.Namespace) -> int:
    """The migration itself (run as its own process so its peak memory is its own)."""
    import cProfile
    import pstats

    from advplugin.bulk import migrate
    from advplugin.gallery import Gallery
    from advplugin.gallery.erasure import ErasureKeyStore
    from advplugin.gallery.master_keys import LocalKeyProvider

    source, protector = _source_and_protector(args)
    gallery = Gallery.open(args.gallery_url, upgrade=True)
    if args.master_key:
        # As `advplugin migrate` opens a gallery by default: sealed, with an erasure key store
        # (a key per new subject, kept outside the gallery database).
        store = ErasureKeyStore.open(Path(args.master_key).with_name("erasure-keys.db"))
        gallery.unlock(LocalKeyProvider.from_file(args.master_key, create=True), erasure=store)
    sql_s: dict[str, float] = {}

    # The gallery's own SQL (client + server time of each statement): the part of the
    # migration no Python-side change can remove, so plain_load_s / sum(sql_s) is a ceiling
    # for the ratio with this schema.
    @sa.event.listens_for(gallery.engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        conn.info["bench_t0"] = time.perf_counter()

    @sa.event.listens_for(gallery.engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        words = statement.split()
        what = " ".join(words[:3]) if words[0].upper() == "INSERT" else words[0]
        sql_s[what] = sql_s.get(what, 0.0) + time.perf_counter() - conn.info.pop("bench_t0")

    if gallery.dialect == "postgresql":  # COPY runs on the driver's cursor, past those events
        import psycopg

        plain_copy = psycopg.Cursor.copy

        @contextmanager
        def timed_copy(self, statement, *a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            with plain_copy(self, statement, *a, **k) as cp:
                yield cp
            what = " ".join(str(statement).split()[:2])
            sql_s[what] = sql_s.get(what, 0.0) + time.perf_counter() - t

        psycopg.Cursor.copy = timed_copy  # type: ignore[method-assign,assignment]

    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    result = migrate(source, gallery, protector, extractor_name="bench", extractor_version="1",
                     chunk_size=args.chunk_size, workers=args.workers)
    if prof:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    sealed = gallery.seal_info().sealed
    gallery.close()
    source.close()
    print(json.dumps({"rows": result.written, "seconds": result.seconds, "sealed": sealed,
                      "sql_s": dict(sorted(sql_s.items(), key=lambda kv: -kv[1]))}))
    return 0


def dry_child(args: argparse.Namespace) -> int:
    """What the migration does before it writes anything, timed alone: read the source,
    protect (the same threads) and, for a sealed gallery, make each new subject's key, wrap
    it under a gallery key and seal every template under it (fresh keys in memory, no key
    store, no SQL). plain load s / this is the most the ratio could be if every write of the
    gallery cost nothing."""
    import secrets

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from advplugin.bulk.pipeline import ParallelProtect, prefetch, protected_chunks
    from advplugin.gallery.sealing import Sealer, subject_key_ad, template_ad

    source, protector = _source_and_protector(args)
    protect = ParallelProtect(protector, args.workers)
    wrap = AESGCM(AESGCM.generate_key(256))
    start, rows, next_id = time.perf_counter(), 0, 1
    ciphers: dict[str, AESGCM] = {}
    for chunk, templates in prefetch(protected_chunks(source.chunks(args.chunk_size, None), protect)):
        assert templates is not None
        rows += len(templates)
        if not args.master_key:
            continue
        for name in dict.fromkeys(chunk.subjects):
            if name not in ciphers:
                raw, nonce = secrets.token_bytes(32), secrets.token_bytes(12)
                wrap.encrypt(nonce, raw, subject_key_ad(1, name, 1))
                ciphers[name] = AESGCM(raw)
        ads = [template_ad(1, next_id + i, "xnn", 1, "0" * 16, "k", DIM) for i in range(len(templates))]
        next_id += len(templates)
        Sealer.seal_vectors([ciphers[n] for n in chunk.subjects], ads, templates)
    seconds = time.perf_counter() - start
    protect.close()
    source.close()
    print(json.dumps({"rows": rows, "seconds": seconds}))
    return 0


def _vm_hwm_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(source_url: str, gallery_url: str, master_key: Path | None, args: argparse.Namespace,
              profile_to: Path | None, dry: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--source-url", source_url, "--gallery-url", gallery_url,
           "--chunk-size", str(args.chunk_size), "--workers", str(args.workers)] + (["--dry"] if dry else [])
    if master_key:
        cmd += ["--master-key", str(master_key)]
    if profile_to:
        cmd += ["--profile"]
    peak = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_mib(proc.pid))
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"migration into {gallery_url} failed:\n{stderr[-3000:]}")
    if profile_to:
        profile_to.write_text(stderr)
    return json.loads(stdout.strip().splitlines()[-1]) | {"peak_rss_mib": peak}


def _pg_admin(url: str) -> sa.Engine:
    return sa.create_engine(sa.engine.make_url(url), isolation_level="AUTOCOMMIT")


def fresh_pg(admin_url: str) -> tuple[str, str]:
    name = f"advplugin_bench_{uuid.uuid4().hex[:8]}"
    engine = _pg_admin(admin_url)
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False), name


def drop_pg(admin_url: str, name: str) -> None:
    engine = _pg_admin(admin_url)
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="50,000 rows")
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--unsealed", action="store_true", help="migrate into a plaintext gallery")
    ap.add_argument("--profile", action="store_true", help="cProfile the migrations (results/*.prof.txt)")
    ap.add_argument("--pg-url", default=DEFAULT_PG, help="server to create the databases on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source-url", help=argparse.SUPPRESS)
    ap.add_argument("--gallery-url", help=argparse.SUPPRESS)
    ap.add_argument("--master-key", help=argparse.SUPPRESS)
    ap.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return dry_child(args) if args.dry else child(args)
    rows_n = 50_000 if args.quick else args.rows
    figures: dict[str, object] = {"rows": rows_n, "dim": DIM, "scheme": "xnn", "chunk_size": args.chunk_size,
                                  "workers": args.workers, "sealed": not args.unsealed, "goal_ratio": GOAL,
                                  "raw_vectors_mib": rows_n * DIM * 4 / 2**20}
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        master = None if args.unsealed else work / "master.key"
        for backend in args.backends.split(","):
            made: list[str] = []
            try:
                if backend == "sqlite":
                    src_url, gal_url = f"sqlite:///{work / 'source.db'}", f"sqlite:///{work / 'gallery.db'}"
                elif backend == "postgresql":
                    src_url, a = fresh_pg(args.pg_url)
                    gal_url, b = fresh_pg(args.pg_url)
                    made = [a, b]
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                load_s = plain_load(src_url, rows_n, args.chunk_size)
                print(f"{backend}: plain load {rows_n / load_s:.0f} rows/s", flush=True)
                prof = Path(__file__).parent / "results" / f"migration_profile_{backend}.txt" if args.profile else None
                run = run_child(src_url, gal_url, master, args, prof)
                print(f"{backend}: migration {run['rows'] / run['seconds']:.0f} rows/s", flush=True)
                dry = run_child(src_url, gal_url, master, args, None, dry=True)
                print(f"{backend}: read + protect + seal alone {dry['rows'] / dry['seconds']:.0f} rows/s", flush=True)
            finally:
                for name in made:
                    drop_pg(args.pg_url, name)
            base_rate, rate = rows_n / load_s, run["rows"] / run["seconds"]
            ratio = rate / base_rate
            figures[backend] = {
                "plain_load": "COPY FROM STDIN" if backend == "postgresql" else "executemany, one transaction",
                "plain_load_rows_per_s": base_rate, "migration_rows_per_s": rate, "ratio": ratio,
                "met": ratio >= GOAL, "migration_s": run["seconds"], "plain_load_s": load_s,
                "migrated_rows": run["rows"], "gallery_sealed": run["sealed"], "peak_rss_mib": run["peak_rss_mib"],
                "migration_sql_s": sum(run["sql_s"].values()), "migration_sql_s_by_statement": run["sql_s"],
                "ratio_ceiling_sql_only": load_s / sum(run["sql_s"].values()),
                "no_writes_s": dry["seconds"], "ratio_ceiling_no_writes": load_s / dry["seconds"],
            }
            out_rows.append([backend, rows_n, figures[backend]["plain_load"], base_rate, rate, ratio,
                             "met" if ratio >= GOAL else "NOT met", figures[backend]["ratio_ceiling_sql_only"],
                             figures[backend]["ratio_ceiling_no_writes"], run["peak_rss_mib"], run["sealed"]])
    table(
        f"Migration vs plain bulk load ({rows_n} x {DIM}-d, xnn, chunks of {args.chunk_size}, "
        f"{args.workers} protect threads, load average {os.getloadavg()[0]:.1f})",
        ["database", "rows", "plain load", "plain rows/s", "migration rows/s", "ratio", f"goal >= {GOAL}",
         "ceiling: plain s / migration's SQL s", "ceiling: plain s / no-write s", "peak RSS MiB", "sealed"],
        out_rows,
    )
    print(f"raw vectors: {figures['raw_vectors_mib']:.0f} MiB; peak RSS is the migration process's own")
    print("ceiling: the ratio if everything but the gallery's own SQL statements (templates, change log, "
          "items, subjects, ids) cost nothing")
    print("no-write ceiling: the ratio if the gallery's writes cost nothing (reading the source, protecting and "
          "sealing timed alone, same threads)")
    write_results("migration_throughput", figures, command="python benchmarks/migration_throughput.py"
                  + (" --quick" if args.quick else f" --rows {rows_n}") + (" --unsealed" if args.unsealed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
