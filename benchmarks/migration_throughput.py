"""Migration throughput and peak memory: random 512-d vectors -> protected gallery on SQLite
and PostgreSQL, through the real `advplugin migrate` command.

    .venv/bin/python benchmarks/migration_throughput.py                 # 1,000,000 rows
    .venv/bin/python benchmarks/migration_throughput.py --rows 100000   # quicker

The source is an uncompressed .npz (vectors, subjects), written chunk by chunk. Each
migration runs as its own process; its peak memory is that process's maximum resident set
(VmHWM), which shows whether streaming really bounds memory (the vectors alone are
rows x 512 x 4 bytes). Speed is also given as a ratio against a baseline measured in the
same run on the same database: a plain bulk INSERT of the same raw float32 rows into a
three-column table (no protection, no checkpoint, no gallery bookkeeping), on up to 100,000
rows. Numbers depend on the machine and its load: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from advplugin.keys import write_key

DEFAULT_PG = os.environ.get(
    "ADVPLUGIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BASELINE_ROWS = 100_000


def write_source(path: Path, rows: int, dim: int, chunk: int = 50_000) -> None:
    """An .npz like a team's export, streamed chunk by chunk with plain writes (no memmap:
    this process's own peak RSS must stay small, see `run_migration`)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("embedding.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
            np.lib.format.write_array_header_2_0(f, header)
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                f.write(rng.standard_normal((stop - start, dim), dtype=np.float32).tobytes())
        subjects = np.array([f"person{i // 5:07d}" for i in range(rows)])
        with z.open("identity.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, subjects)


def baseline_insert(url: str, source: Path, rows: int, chunk: int) -> float:
    """Rows per second of a plain INSERT of raw float32 bytes (the floor any copy pays)."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    table = sa.Table(
        "baseline_raw",
        meta,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("subject", sa.String(255)),
        sa.Column("vec", sa.LargeBinary),
    )
    meta.create_all(engine)
    with np.load(source) as data:
        subjects = data["identity"][:rows]
    from advplugin.bulk import open_source

    src = open_source(str(source))
    start = time.perf_counter()
    done = 0
    for c in src.chunks(chunk):
        take = min(len(c), rows - done)
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [
                    {
                        "id": done + i,
                        "subject": str(subjects[done + i]),
                        "vec": c.vectors[i].tobytes(),
                    }
                    for i in range(take)
                ],
            )
        done += take
        if done >= rows:
            break
    seconds = time.perf_counter() - start
    src.close()
    meta.drop_all(engine)
    engine.dispose()
    return done / seconds


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_migration(source: Path, gallery: str, key: Path, chunk: int, workers: int) -> dict:
    """One `advplugin migrate` process. Its peak RSS is its own VmHWM, sampled until it
    exits (not `wait4`'s ru_maxrss: on Linux that starts at the parent's peak, which exec
    carries over into the child)."""
    cmd = [
        sys.executable, "-m", "advplugin.cli.main", "migrate", "--from", str(source),
        "--to", gallery, "--upgrade", "--scheme", "xnn", "--key", str(key),
        "--extractor", "random", "--chunk-size", str(chunk), "--workers", str(workers),
        "--no-progress",
    ]  # fmt: skip
    peak = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_mib(proc.pid) or 0.0)
            time.sleep(0.2)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"migration into {gallery} failed:\n{stderr[-2000:]}")
    m = re.search(r"migrated: (\d+) rows in ([\d.]+) s", stdout)
    assert m, stdout
    return {
        "rows": int(m.group(1)),
        "migrate_s": float(m.group(2)),
        "wall_s": wall,
        "peak_mib": peak,
    }


def fresh_pg(admin_url: str) -> tuple[str, str]:
    base = sa.engine.make_url(admin_url)
    name = f"advplugin_bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False), name


def drop_pg(admin_url: str, name: str) -> None:
    engine = sa.create_engine(sa.engine.make_url(admin_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--pg-url", default=DEFAULT_PG, help="server (and database) to create DBs on")
    ap.add_argument("--workdir", help="where the source and SQLite files go (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        source = work / "source.npz"
        t0 = time.perf_counter()
        write_source(source, args.rows, args.dim)
        print(
            f"source: {args.rows} random {args.dim}-d float32 vectors "
            f"({source.stat().st_size / 2**20:.0f} MiB), written in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        key = work / "bench.key"
        write_key(key)
        results = []
        for backend in args.backends.split(","):
            pg_name = None
            if backend == "sqlite":
                url = f"sqlite:///{work / 'gallery.db'}"
            elif backend == "postgresql":
                url, pg_name = fresh_pg(args.pg_url)
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            try:
                base_rate = baseline_insert(
                    url, source, min(args.rows, BASELINE_ROWS), args.chunk_size
                )
                run = run_migration(source, url, key, args.chunk_size, args.workers)
            finally:
                if pg_name:
                    drop_pg(args.pg_url, pg_name)
            rate = run["rows"] / run["migrate_s"]
            results.append((backend, run, rate, base_rate, run["peak_mib"]))
            print(f"{backend}: done", flush=True)

    raw_mib = args.rows * args.dim * 4 / 2**20
    print()
    print(f"migration of {args.rows} x {args.dim}-d vectors, chunks of {args.chunk_size}, "
          f"{args.workers} protection threads, {os.cpu_count()} cores; raw vectors = {raw_mib:.0f} MiB")  # fmt: skip
    header = (
        f"| {'target':10} | {'rows':>9} | {'migrate s':>9} | {'wall s':>7} | {'rows/s':>8} "
        f"| {'plain INSERT rows/s':>19} | {'ratio':>5} | {'peak RSS MiB':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for backend, run, rate, base_rate, peak in results:
        print(
            f"| {backend:10} | {run['rows']:>9} | {run['migrate_s']:>9.1f} | {run['wall_s']:>7.1f} "
            f"| {rate:>8.0f} | {base_rate:>19.0f} | {rate / base_rate:>5.2f} | {peak:>12.0f} |"
        )
    print("ratio = migration rows/s / plain INSERT rows/s on the same database in this run; "
          "wall s includes start-up and the validation pass")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
