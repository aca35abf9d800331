"""Every benchmark with one command, then the key ratios against their goals as a table and a
plot, read back from the results files (so a later run compares with the committed one).

    .venv/bin/python benchmarks/run_all.py --quick          # the standard set, short (~10 min)
    .venv/bin/python benchmarks/run_all.py                  # the standard set, full (~30 min)
    .venv/bin/python benchmarks/run_all.py --with-slow      # + accuracy / training-size runs
    .venv/bin/python benchmarks/run_all.py --only http_load,protect_throughput
    .venv/bin/python benchmarks/run_all.py --summary        # no run: table + plot of results/

Each benchmark runs as its own process (its memory and threads its own), one after another
(never two at once: on a shared 2-core machine they would measure each other), with
OMP_NUM_THREADS=1 unless set, and writes benchmarks/results/<name>.json itself through
`common.write_results` (machine, versions, load average, date, each figure beside its baseline
from the same run). This script then writes results/summary.json and results/ratios.svg
(or .png with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write_results


@dataclass(frozen=True)
class Bench:
    name: str  # results/<name>.json
    script: str
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] = ()
    slow: bool = False  # opt-in (--with-slow): long, accuracy rather than speed


BENCHES = (
    Bench("protect_throughput", "protect_throughput.py", ("--quick",)),
    Bench("identify_overhead", "identify_overhead.py"),
    Bench("migration_throughput", "migration_throughput.py", ("--quick",)),
    Bench("http_load", "http_load.py", ("--quick",)),
    Bench("image_cost", "image_cost_bench.py"),
    Bench("service_bench", "service_bench.py", ("--quick",)),
    Bench("sealed_storage", "sealed_storage.py"),
    Bench("milvus", "milvus.py"),
    Bench("dlib_torch", "dlib_torch.py", slow=True),
    Bench("blind", "blind.py", slow=True),
    Bench("xnnd_eval", "xnnd_eval.py", slow=True),
)
TIMEOUT_S = 600  # one benchmark; the project's rule for any single command


# -- the key ratios, read from results files -------------------------------------------------------
def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def key_ratios() -> list[dict[str, object]]:
    """[{figure, value, goal, direction ('<=' or '>='), met, source, date}] from results/."""
    out: list[dict[str, object]] = []

    def add(figure: str, value: float, goal: float, direction: str, doc: dict) -> None:
        met = value <= goal if direction == "<=" else value >= goal
        out.append({"figure": figure, "value": value, "goal": goal, "direction": direction, "met": met,
                    "source": f"results/{doc['benchmark']}.json", "date": doc["date"],
                    "load_average_1m": doc["machine"].get("load_average_1m")})

    if doc := _load("identify_overhead"):
        f = doc["figures"]
        for r in f["rows"]:
            add(f"Matcher.identify / bare FAISS, {r['templates']:,} templates, batch {r['batch']}, p50",
                r["ratio_p50"], f["goal_ratio"], "<=", doc)
    if doc := _load("http_load"):
        iv = doc["figures"]["image_vs_bare"]
        add("POST /identify latency / bare extract+protect, p50, 1 client", iv["ratio_p50"],
            doc["figures"]["goal_image_ratio"], "<=", doc)
    if doc := _load("migration_throughput"):
        f = doc["figures"]
        for db in ("sqlite", "postgresql"):
            if db in f:
                add(f"migration / plain bulk load, {db} ({'COPY' if db == 'postgresql' else 'executemany'}), "
                    f"{'sealed' if f['sealed'] else 'unsealed'}", f[db]["ratio"], f["goal_ratio"], ">=", doc)
    if doc := _load("protect_throughput"):
        f = doc["figures"]
        for scheme, goal in f.get("goals", {}).items():
            r = f.get(f"{scheme}/b1024/t2")
            if r:
                add(f"protect {scheme}, batch 1,024, 2 threads: templates/s / goal", r["templates_per_s"] / goal["templates_per_s"],
                    1.0, ">=", doc)
    return out


def summary_table(rows: list[dict[str, object]]) -> str:
    lines = ["| figure | measured | goal | met | load avg | source, date |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['value']:.3g} | {r['direction']} {r['goal']} | "
                     f"{'yes' if r['met'] else '**no**'} | {r['load_average_1m']:.1f} | {r['source']}, {str(r['date'])[:16]} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]]) -> Path:
    """Each ratio as a bar, its goal as a tick: matplotlib when installed, else a plain SVG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(rows)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.2))
    labels = [str(r["figure"]) for r in rows]
    values = [float(r["value"]) for r in rows]  # type: ignore[arg-type]
    colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
    y = range(len(rows))
    ax.barh(list(y), values, color=colors)
    for i, r in enumerate(rows):
        ax.plot([r["goal"], r["goal"]], [i - 0.4, i + 0.4], color="black", lw=2)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (black tick: goal; green: met, red: not met)")
    ax.set_title("advplugin: key ratios against goals (benchmarks/results/*.json)", fontsize=9)
    fig.tight_layout()
    path = RESULTS / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _svg(rows: list[dict[str, object]]) -> Path:
    width, left, bar_h = 900, 460, 18
    top = max([float(r["value"]) for r in rows] + [float(r["goal"]) for r in rows] + [1.0]) * 1.1  # type: ignore[arg-type]
    scale = (width - left - 20) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{len(rows) * 24 + 40}" '
             'font-family="sans-serif" font-size="10">']
    for i, r in enumerate(rows):
        y = 20 + i * 24
        color = "#2a2" if r["met"] else "#c22"
        parts.append(f'<text x="4" y="{y + 13}">{str(r["figure"])[:80]}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{float(r["value"]) * scale:.1f}" height="{bar_h}" fill="{color}"/>')  # type: ignore[arg-type]
        gx = left + float(r["goal"]) * scale  # type: ignore[arg-type]
        parts.append(f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{y - 2}" y2="{y + bar_h + 2}" stroke="black" stroke-width="2"/>')
    parts.append("</svg>")
    path = RESULTS / "ratios.svg"
    path.write_text("\n".join(parts) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="each benchmark's short form where it has one")
    ap.add_argument("--with-slow", action="store_true", help="also the opt-in long benchmarks")
    ap.add_argument("--only", help="comma-separated names (results/<name>.json)")
    ap.add_argument("--summary", action="store_true", help="run nothing: table and plot of results/")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    runs = []
    if not args.summary:
        wanted = set(args.only.split(",")) if args.only else None
        unknown = (wanted or set()) - {b.name for b in BENCHES}
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {[b.name for b in BENCHES]}")
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        for b in BENCHES:
            if (wanted is not None and b.name not in wanted) or (wanted is None and b.slow and not args.with_slow):
                continue
            cmd = [sys.executable, str(here / b.script), *(b.quick if args.quick else b.full)]
            print(f"== {b.name}: {' '.join(cmd[1:])}", flush=True)
            t = time.perf_counter()
            try:
                rc = subprocess.run(cmd, env=env, timeout=TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = -1
            runs.append({"benchmark": b.name, "returncode": rc, "seconds": time.perf_counter() - t})
            print(f"== {b.name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {runs[-1]['seconds']:.0f} s", flush=True)
    rows = key_ratios()
    print("\n## Key ratios against goals (from benchmarks/results/)\n")
    print(summary_table(rows))
    path = plot(rows)
    print(f"\nplot: {path.relative_to(here.parent)}")
    if runs:
        table("Runs", ["benchmark", "return code", "seconds"], [[r["benchmark"], r["returncode"], r["seconds"]] for r in runs])
    write_results("summary", {"key_ratios": rows, "runs": runs, "plot": path.name},
                  command="python benchmarks/run_all.py " + " ".join(sys.argv[1:]))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
