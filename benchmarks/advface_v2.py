"""`advface` v2 (complete loop + adaptive game) against v1 and `xnn`: held-out accuracy, and
the harness's naive and adaptive reconstruction rows (issue 15, Build 2).

    .venv/bin/python benchmarks/advface_v2.py              # one harness run, 3 rows: ~1.5 h
    .venv/bin/python benchmarks/advface_v2.py --reuse      # re-read the run's report.json
    .venv/bin/python benchmarks/advface_v2.py --quick      # the harness's --quick: minutes

One `advplugin evaluate` run through its command line (the harness is not changed or
re-implemented here) with a row per scheme (`--scheme advface:version=2,transform=none`
...), the options of the committed reports: lfw-dev split by `evaluate-split` (attacks trained
on the train people, measured on the other people), the mobileface scorer (type II) and dlib
(type I) as judges, the shipped dlib cache, one thread. Its `none` row (the decoder on raw
embeddings) is the baseline measured in the same run; `--also REPORT` adds the rows of
another run with the same options (same seed: the same `none` row). The advface rows use
`transform=none`: the noise alone, i.e. what an attacker who holds the key faces (keyed, the
naive decoder sees a rotated space and fails for every scheme alike, `xnn` included).

Also, in this process: the 10-fold accuracy on the lfw-dev pairs among held-out people (the
evaluation's test side, as the weights' training records), raw vs each scheme.
Writes benchmarks/results/advface_v2.json (`--results-name` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, REPO, table, write_results

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation.data import identity_in_test, split_identities
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.training.common import pair_accuracy

COMMAND = ".venv/bin/python benchmarks/advface_v2.py"
#: label -> (scheme, options) of each row.
RUNS: dict[str, tuple[str, dict[str, object]]] = {
    "advface_v2": ("advface", {"version": 2, "transform": "none"}),
    "advface_v1": ("advface", {"version": 1, "transform": "none"}),
    "xnn": ("xnn", {}),
}


def spec(label: str) -> str:
    """The `--scheme NAME:KEY=VALUE,...` of a row (also the row's label in the report)."""
    scheme, options = RUNS[label]
    return scheme + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def harness(labels: list[str], args: argparse.Namespace) -> Path:
    """One `advplugin evaluate` run with a row per label (or its report with --reuse); the
    harness rewrites report.json after every row, so an unfinished run still has rows."""
    out = args.work / "+".join(labels)
    report = out / "report.json"
    if not (args.reuse and report.is_file()):
        cmd = [
            str(REPO / ".venv/bin/advplugin"), "evaluate",
            *[a for label in labels for a in ("--scheme", spec(label))],
            "--train-images", str(args.split_dir / "train"),
            "--test-images", str(args.split_dir / "test"),
            "--scorer", str(args.scorer),
            "--embeddings-cache", str(args.data / "lfw-dev-dlib128.npz"),
            "--threads", "1", "--no-progress", "--out", str(out),
            "--decoder-identity-weight", str(args.decoder_identity_weight),
            *(["--quick"] if args.quick else []),
        ]  # fmt: skip
        print(" ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"harness: {time.perf_counter() - t0:.0f} s", flush=True)
    return report


def _accepted(judged: dict[str, object] | None) -> dict[str, float] | None:
    """Acceptance of reconstructions as the right person (another photo of them), per judge
    (type II: the independent scorer; type I: dlib) and FAR."""
    if judged is None:
        return None
    return {
        f"{kind}@{far}": judged[kind][far]["accepted_other_photo"]  # type: ignore[index]
        for kind in ("type_ii", "type_i")
        for far in ("1e-3", "1e-2")
    }


def rows_of(report: dict[str, object]) -> dict[str, dict[str, object]]:
    """The figures this benchmark compares, per row of one report (`none` and the schemes)."""
    out = {}
    for name, row in report["rows"].items():  # type: ignore[attr-defined]
        recon, ident = row["reconstruction"], row["identification"]
        out[name] = {
            "verification_accuracy": row["utility"]["verification_accuracy"],
            "tar_at_far_1e-3": row["utility"]["tar_at_far_1e-3"],
            "rank1": row["utility"]["rank1"],
            "naive": _accepted(recon["naive"]),
            "naive_ssim": None if recon["naive"] is None else recon["naive"]["ssim"],
            "adaptive": _accepted(recon["adaptive"]),
            "adaptive_ssim": recon["adaptive"]["ssim"],
            "identification_naive": ident["naive"],
            "identification_linear": ident["linear_map"],
            "identification_mlp": ident["mlp_map"],
            "d_sys": row["unlinkability"]["d_sys"],
            "linear_residual": row["key_recovery"]["linear_residual"],
            "key_recovery": row["key_recovery"]["sweep"],
        }  # fmt: skip
    return out


def heldout(data: Path, labels: list[str]) -> dict[str, dict[str, float]]:
    """10-fold accuracy on the lfw-dev pairs among held-out people, raw and per scheme."""
    emb = load_embedding_set(data / "lfw-dev-dlib128.npz")
    test = np.array([identity_in_test(str(i), 0.5) for i in emb.identity])
    raw, paths = emb.embedding[test].astype(np.float32), emb.path[test]
    pairs = data / "lfw-dev-pairs.txt"
    acc_raw, n = pair_accuracy(raw, paths, pairs)
    out = {"raw": {"accuracy": acc_raw, "pairs": n}}
    key = Key.generate()
    for label in labels:
        scheme, options = RUNS[label]
        t = create_protector(scheme, key=key, dim=raw.shape[1], **options).protect(raw)
        acc, _ = pair_accuracy(t, paths, pairs)
        out[label] = {"accuracy": acc, "vs_raw_pp": 100 * (acc - acc_raw)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=FACE_DATA)
    ap.add_argument("--split-dir", type=Path, default=Path("/tmp/evalsplit/lfw"))
    ap.add_argument("--scorer", type=Path, default=REPO.parent / "shared/models/mobileface.onnx")
    ap.add_argument("--work", type=Path, default=Path("/tmp/advface-v2/eval"))
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated of {list(RUNS)}")
    ap.add_argument(
        "--also", type=Path, action="append", default=[],
        help="report.json of another finished run with the same options (rows added)",
    )  # fmt: skip
    ap.add_argument("--decoder-identity-weight", type=float, default=0.0)
    ap.add_argument("--reuse", action="store_true", help="read the finished run's report.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-name", default="advface_v2")
    args = ap.parse_args(argv)
    if args.quick:
        args.work = args.work.with_name(args.work.name + "-quick")
        args.results_name += "_quick"
    labels = [r for r in args.runs.split(",") if r]
    if unknown := set(labels) - set(RUNS):
        ap.error(f"unknown runs {sorted(unknown)}")
    if not (args.split_dir / "train").is_dir():
        split_identities(args.data / "lfw-dev", args.split_dir, test_fraction=0.5)
    figures: dict[str, object] = {"heldout_pairs_accuracy": heldout(args.data, list(RUNS))}
    reports = [harness(labels, args), *args.also]
    rows: dict[str, dict[str, object]] = {}
    figures["reports"] = []
    for path in reports:
        report = json.loads(path.read_text())
        found = rows_of(report)
        rows.update(found)
        figures["reports"].append({  # type: ignore[attr-defined]
            "path": str(path), "rows": list(found), "pending": report.get("pending", []),
            "decoder": report["decoder"], "data": report["data"], "seconds": report["seconds"],
        })  # fmt: skip
    by_label = {spec(label): label for label in RUNS}
    figures["rows"] = {by_label.get(name, name): row for name, row in rows.items()}
    write_results(args.results_name, figures, command=" ".join([COMMAND, *(argv or sys.argv[1:])]))
    pct = "{:.2%}".format
    acc = figures["heldout_pairs_accuracy"]
    lines = []
    for label, row in figures["rows"].items():  # type: ignore[attr-defined]
        held = acc.get(label, acc["raw"])  # type: ignore[attr-defined]
        naive = row["naive"]
        lines.append([
            label, pct(held["accuracy"]), f"{held.get('vs_raw_pp', 0.0):+.2f}",
            "-" if naive is None else pct(naive["type_ii@1e-3"]),
            pct(row["adaptive"]["type_ii@1e-3"]),
            "-" if naive is None else pct(naive["type_i@1e-3"]),
            pct(row["adaptive"]["type_i@1e-3"]),
            pct(row["identification_naive"]), pct(row["identification_linear"]),
            f"{row['d_sys']:.3f}",
        ])  # fmt: skip
    table(
        "advface v2 vs v1 vs xnn: reconstructions accepted at FAR 1e-3 (II: mobileface, I: dlib)",
        ["row", "held-out acc.", "vs raw pp", "naive II", "adaptive II", "naive I",
         "adaptive I", "ident. naive", "ident. linear", "D_sys"],
        lines,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
