"""What every benchmark shares: a markdown table on stdout, percentiles, and the results file
(`benchmarks/results/<name>.json`) with the machine, the versions and the date, so a later
run can be compared with this one. Every figure is stored beside the baseline measured in the
same run."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
FACE_DATA = Path(os.environ.get("ADVPLUGIN_FACE_DATA", REPO.parent / "shared" / "data"))


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")


def ms(values: Sequence[float], q: float) -> float:
    """The q-th percentile of durations in seconds, in milliseconds."""
    return float(np.percentile(values, q)) * 1000


def machine() -> dict[str, object]:
    versions = {}
    for pkg in ("advplugin", "numpy", "faiss-cpu", "torch", "sqlalchemy", "fastapi"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "platform": platform.platform(), "python": sys.version.split()[0], "versions": versions,
    }


def write_results(name: str, figures: dict[str, object], *, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name, "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "figures": figures,
    }
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"\nresults: {path.relative_to(REPO)}")
    return path
