"""Calibrated decision thresholds (issue 21, item 2): the score at FMR 1e-2, 1e-3, 1e-4 and
1e-5 of raw dlib embeddings and of every scheme's templates, in the scheme's own scorer's
units, and the FNMR there; what `advplugin.protectors.calibration` ships.

    .venv/bin/python benchmarks/calibrate.py            # ~15 s on one core
    .venv/bin/python benchmarks/calibrate.py --check    # exit 1 if a shipped number is stale

Data: the dlib embeddings of every lfw-dev image (`lfw-dev-dlib128.npz`, 9,949 images of
4,591 people). Every pair is scored, not a sample (`advplugin.evaluation.calibration`): all
49.4 M impostor pairs and all 86,777 genuine pairs (people with two or more images), by
the scheme's keyless scorer (`scheme_info(name).scorer(128, **options)`). A pair is accepted
where score >= threshold; the threshold at FMR f is rounded UP to 4 decimals, and the FMR and
FNMR are measured at the rounded value. Rows:
- raw dlib (the `none` scheme: cosine of the unit descriptors): the extractor's calibration,
  which `none` and orthogonal `xnn` use; the `xnn` row checks that it holds (same thresholds);
- `advface` versions 1 and 2, `xnn-d` releases 2 and 1: each ships its own;
- `xnn matrix=gaussian` under 3 keys: its thresholds move with the key, so none ships.
Checks beside each row: the thresholds under a second key (the keyed transforms are
orthogonal, so a scheme's scores should not depend on the key); the FMR at the shipped
thresholds among the held-out people alone (the evaluation's test side,
`identity_in_test(name, 0.5)`: the trained schemes never saw them; 13.1 M impostor pairs), to
show how far the rates move between two sets of people; LFW's 10-fold accuracy on
lfw-dev-pairs.txt. Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, table, write_results

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation.calibration import measure, pair_tails, ten_fold
from advplugin.evaluation.data import identity_in_test
from advplugin.keys import Key
from advplugin.protectors import create_protector, scheme_info
from advplugin.protectors.calibration import COMMAND, FMRS, calibration_for

#: (row, scheme, options): the rows whose calibration ships (the raw row as dlib's own).
ROWS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("dlib raw (none)", "none", {}),
    ("xnn", "xnn", {}),
    ("advface v1", "advface", {"version": 1}),
    ("advface v2", "advface", {"version": 2}),
    ("xnn-d release 2", "xnn-d", {"release": 2}),
    ("xnn-d release 1", "xnn-d", {"release": 1}),
)
EXTRACTOR = "dlib"
#: Shipped and measured thresholds may differ by float rounding (BLAS, one 4-decimal step).
TOLERANCE = 1.01e-4


def seeded_key(seed: int) -> Key:
    """Keys from the seed, so that a rerun scores the very same templates."""
    return Key(np.random.default_rng(seed).bytes(32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=FACE_DATA)
    ap.add_argument("--seed", type=int, default=0, help="seed of the keys")
    ap.add_argument("--gaussian-keys", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="exit 1 where a shipped number differs")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    emb = load_embedding_set(args.data / "lfw-dev-dlib128.npz")
    raw, ident, paths = emb.embedding, emb.identity, emb.path
    heldout = np.array([identity_in_test(str(i), 0.5) for i in ident])
    pairs_file = str(args.data / "lfw-dev-pairs.txt")
    key, other_key = seeded_key(args.seed), seeded_key(args.seed + 1)

    figures: dict[str, object] = {
        "data": "lfw-dev-dlib128.npz", "images": len(raw), "people": len(np.unique(ident)),
        "heldout_images": int(heldout.sum()), "extractor": EXTRACTOR, "fmrs": list(FMRS),
        "rule": "accept where score >= threshold; threshold rounded up to 4 decimals",
    }  # fmt: skip
    rows, stale = [], []
    for label, scheme, options in ROWS:
        t0 = time.perf_counter()
        score = scheme_info(scheme).scorer(128, **options)
        p = create_protector(scheme, key=key, dim=128, **options)
        templates = p.protect(raw)
        m = measure(pair_tails(score, templates, ident))
        # The same scheme under another key: its scores (so its thresholds) should not move.
        second = create_protector(scheme, key=other_key, dim=128, **options).protect(raw)
        m2 = measure(pair_tails(score, second, ident))
        key_shift = max(abs(a - b) for a, b in zip(m.exact_thresholds, m2.exact_thresholds, strict=True))
        held = pair_tails(score, templates[heldout], ident[heldout], max_fmr=0.05)
        held_fmr = [held.fmr_at(t) for t in m.thresholds]
        held_fnmr = [held.fnmr_at(t) for t in m.thresholds]
        accuracy, accuracy_std = ten_fold(score, templates, paths, pairs_file)
        shipped = calibration_for(scheme, EXTRACTOR, **options)
        shipped_t = None if shipped is None else [shipped.threshold(f) for f in FMRS]
        matches = shipped_t is not None and all(
            abs(a - b) <= TOLERANCE for a, b in zip(shipped_t, m.thresholds, strict=True)
        )
        if not matches:
            stale.append(label)
        figures[label] = {
            "scheme": scheme, "options": options, "measured": m.as_dict(),
            "threshold_shift_other_key": key_shift,
            "heldout": {"impostor_pairs": held.impostor_pairs, "genuine_pairs": len(held.genuine),
                        "fmr_at_shipped": held_fmr, "fnmr_at_shipped": held_fnmr},
            "lfw_dev_pairs_10fold": {"accuracy": accuracy, "std": accuracy_std},
            "shipped_thresholds": shipped_t, "shipped_matches": matches,
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        for i, f in enumerate(FMRS):
            rows.append([
                label, f"{f:g}", f"{m.thresholds[i]:.4f}", f"{m.fmr[i]:.2e}", f"{m.fnmr[i]:.4f}",
                f"{held_fmr[i]:.2e}", f"{held_fnmr[i]:.4f}", f"{key_shift:.1e}" if i == 0 else "",
                (f"{100 * accuracy:.2f} %" if i == 0 else ""),
                "yes" if matches else f"NO ({shipped_t[i]:.4f})" if shipped_t else "NO (none)",
            ])  # fmt: skip
        print(f"{label}: {time.perf_counter() - t0:.1f} s", flush=True)

    # -- xnn with a Gaussian matrix: a random projection distorts scores, by the key ------------
    gaussian = []
    for k in range(args.gaussian_keys):
        p = create_protector("xnn", key=seeded_key(1000 + k), dim=128, matrix="gaussian")
        m = measure(pair_tails(scheme_info("xnn").scorer(128, matrix="gaussian"), p.protect(raw), ident))
        gaussian.append(m.exact_thresholds)
    spread = np.ptp(np.array(gaussian), axis=0)
    figures["xnn matrix=gaussian"] = {
        "exact_thresholds_per_key": gaussian, "spread_per_fmr": spread.tolist(),
        "shipped": calibration_for("xnn", EXTRACTOR, matrix="gaussian") is not None,
    }  # fmt: skip

    print(
        f"\n{figures['images']} images of {figures['people']} people; "
        f"{figures['dlib raw (none)']['measured']['impostor_pairs']:,} impostor and "  # type: ignore[index]
        f"{figures['dlib raw (none)']['measured']['genuine_pairs']:,} genuine pairs, all scored; "  # type: ignore[index]
        "accept where score >= threshold"
    )
    table(
        "Decision thresholds (scheme's scorer; dlib embeddings of all lfw-dev)",
        ["scheme", "FMR", "threshold", "FMR measured", "FNMR", "held-out FMR", "held-out FNMR",
         "other key: max shift", "10-fold acc.", "shipped"],
        rows,
    )  # fmt: skip
    table(
        "xnn matrix=gaussian: exact thresholds per key (none ships)",
        ["key", *(f"FMR {f:g}" for f in FMRS)],
        [[f"key {k}", *(f"{t:.4f}" for t in ts)] for k, ts in enumerate(gaussian)]
        + [["spread", *(f"{s:.4f}" for s in spread)]],
    )
    figures["seconds"] = time.perf_counter() - t_start
    write_results("calibration", figures, command=COMMAND)
    if stale:
        print(f"\nshipped calibration differs from this measurement: {', '.join(stale)}")
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
