"""`xnn-d` (release 2, the default, and release 1 beside it) next to raw, `xnn` and `advface`
on the stored embedding (lfw-dev dlib cache), every attack trained on the evaluation's train
people and measured on its test people (the identity hash of `advplugin evaluate-split`, test
fraction 0.5), all schemes in one run:

    .venv/bin/python benchmarks/xnnd_eval.py            # ~10 min on 2 busy cores

- utility on test people: 10-fold accuracy on lfw-dev pairs among them, TAR at FAR 1e-3 (all
  genuine pairs, up to 2M impostors), rank-1 with distractors (`evaluation.attacks.utility`);
- known-pair attacker: n (photo, template) pairs of train people obtained through the API
  (n = 16 ... 1024 and all), a linear and an MLP map template -> raw embedding, then rank-1
  of the mapped leaked templates of test people among raw embeddings of their other photos
  (`evaluation.attacks.identification_rate`, the harness's protocol);
- the paper's black-box attacker: a fresh identity head (`training.xnnd.train_matcher_head`)
  trained on the attacker's labelled train people through what it can run, re-identifying
  test people (leaked one photo each vs the other photos, same protocol):
  on the raw embedding; on `xnn-d`'s intermediate f = u + G(u) (G ships, so it is public),
  and the cosine of an affine inverse of G fitted on the attacker's own photos;
  on `xnn-d`'s stored templates with the key withheld (the head on S(G(u)), which it can
  compute, applied to keyed templates) and with the key leaked (S leaked with it);
- D_sys across two keys (`evaluation.attacks.unlinkability`): one pair per scheme, and the
  keyed schemes over `--dsys-pairs` key pairs (the same pairs for each; mean, min, max);
- protect + score throughput of `xnn` and `xnn-d` (one thread, all 9,949 embeddings).
Writes benchmarks/results/xnnd_eval.json.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, table, write_results

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation import attacks
from advplugin.evaluation.data import restrict_pairs
from advplugin.evaluation.decoder import (
    apply_linear_map,
    apply_mlp_map,
    fit_linear_map,
    train_mlp_map,
)
from advplugin.evaluation.metrics import rank1_identification, read_pairs
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize
from advplugin.protectors.xnnd import XNNDProtector
from advplugin.protectors.xnnd import mlp as numpy_mlp
from advplugin.training.common import split_masks
from advplugin.training.xnnd import fit_linear_student, train_matcher_head

#: (row name, scheme, options): `xnn-d` is release 2 (the default); release 1 beside it.
SCHEMES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("none", "none", {}),
    ("xnn", "xnn", {}),
    ("advface", "advface", {}),
    ("xnn-d", "xnn-d", {}),
    ("xnn-d release 1", "xnn-d", {"release": 1}),
)


def reidentify(estimates: np.ndarray, search: np.ndarray, identity: np.ndarray) -> float:
    """Rank-1 of leaked probes (one photo per person) among the other photos, both already in
    the attacker's space (the harness's `leak_probes` protocol)."""
    probes, rest = attacks.leak_probes(identity)
    s = l2_normalize(estimates[probes], np.float32) @ l2_normalize(search[rest], np.float32).T
    return rank1_identification(s, identity[probes], identity[rest])


def head_features(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(l2_normalize(x, np.float32))).numpy()


def throughput(p, raw: np.ndarray, repeats: int = 3) -> dict[str, float]:
    best_p = best_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        t = p.protect(raw)
        best_p = min(best_p, time.perf_counter() - t0)
        t0 = time.perf_counter()
        p.score(t[:100], t)
        best_s = min(best_s, time.perf_counter() - t0)
    return {"protect_per_s": len(raw) / best_p, "score_100x_all_s": best_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=FACE_DATA)
    ap.add_argument("--sizes", default="16,64,256,1024")
    ap.add_argument("--head-steps", type=int, default=600)
    ap.add_argument("--mlp-epochs", type=int, default=20)
    ap.add_argument("--max-impostors", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dsys-pairs", type=int, default=6, help="key pairs for D_sys's spread")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    emb = load_embedding_set(args.data / "lfw-dev-dlib128.npz")
    raw, ident, paths = emb.embedding.astype(np.float32), emb.identity, emb.path
    tr, te = split_masks(ident, 0.5)
    protocol = restrict_pairs(read_pairs(str(args.data / "lfw-dev-pairs.txt")), set(map(str, paths[te])))
    sizes = [int(s) for s in args.sizes.split(",")]
    key = Key.generate()
    figures: dict[str, object] = {"train_images": int(tr.sum()), "test_images": int(te.sum())}

    util_rows, known_rows = [], []
    for name, scheme, options in SCHEMES:
        p = create_protector(scheme, key=key, dim=128, **options)
        t_tr, t_te = p.protect(raw[tr]), p.protect(raw[te])
        u = attacks.utility(
            p.score, t_te, ident[te], paths[te], protocol,
            max_impostors=args.max_impostors, rng=rng,
        )  # fmt: skip
        u.pop("roc")
        row: dict[str, object] = {"utility": u}
        known: dict[str, float] = {}
        for n in [*sizes, int(tr.sum())]:
            pick = rng.choice(int(tr.sum()), min(n, int(tr.sum())), replace=False)
            probes, _ = attacks.leak_probes(ident[te])
            w = fit_linear_map(t_tr[pick], raw[tr][pick])
            known[f"linear_{n}"] = attacks.identification_rate(
                apply_linear_map(w, t_te[probes]), raw[te], ident[te]
            )
            mlp = train_mlp_map(
                t_tr[pick], raw[tr][pick], epochs=args.mlp_epochs, seed=args.seed, progress=False
            )
            known[f"mlp_{n}"] = attacks.identification_rate(
                apply_mlp_map(mlp, t_te[probes]), raw[te], ident[te]
            )
        known["naive"] = attacks.identification_rate(t_te[attacks.leak_probes(ident[te])[0]], raw[te], ident[te])
        row["known_pairs"] = known
        if p.keyed:
            second = create_protector(scheme, key=Key.generate(), dim=128, **options)
            link = attacks.unlinkability(
                p.score, t_te, second.protect(raw[te]), ident[te],
                max_impostors=200_000, rng=rng,
            )  # fmt: skip
            row["d_sys"] = link["d_sys"]
            row["d_sys_floor"] = link["d_sys_floor"]
        figures[name] = row
        util_rows.append([
            name, u["verification_accuracy"], u["tar_at_far_1e-3"], u["rank1"], row.get("d_sys", "-"),
        ])  # fmt: skip
        known_rows.append([name, known["naive"], *(known[f"linear_{n}"] for n in sizes),
                           *(known[f"mlp_{n}"] for n in sizes), known[f"mlp_{int(tr.sum())}"]])
        print(f"{name}: done", flush=True)

    # -- D_sys over several key pairs: one pair's estimate varies by a factor of 3-4 between
    # pairs for the same scheme, so schemes are compared on the same pairs, by their mean.
    key_pairs = [(Key.generate(), Key.generate()) for _ in range(args.dsys_pairs)]
    dsys_keys: dict[str, dict[str, object]] = {}
    for name, scheme, options in SCHEMES:
        if not create_protector(scheme, key=key, dim=128, **options).keyed:
            continue
        values = []
        for k1, k2 in key_pairs:
            p1 = create_protector(scheme, key=k1, dim=128, **options)
            p2 = create_protector(scheme, key=k2, dim=128, **options)
            link = attacks.unlinkability(
                p1.score, p1.protect(raw[te]), p2.protect(raw[te]), ident[te],
                max_impostors=200_000, rng=rng,
            )  # fmt: skip
            values.append(float(link["d_sys"]))
        dsys_keys[name] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "values": values}
    figures["d_sys_over_key_pairs"] = dsys_keys

    # -- the paper's black-box attacker --------------------------------------------------------
    p = create_protector("xnn-d", key=key, dim=128)
    assert isinstance(p, XNNDProtector)
    steps, seed = args.head_steps, args.seed

    def head_on(train_x: np.ndarray) -> torch.nn.Module:
        return train_matcher_head(train_x, ident[tr], steps=steps, seed=seed)

    u_tr, u_te = l2_normalize(raw[tr], np.float32), l2_normalize(raw[te], np.float32)
    f_tr, f_te = p.nets.noisy(u_tr), p.nets.noisy(u_te)
    e_tr, e_te = p.matcher_embedding(raw[tr]), p.matcher_embedding(raw[te])
    templates_te = p.protect(raw[te])
    h_raw, h_f, h_e = head_on(u_tr), head_on(f_tr), head_on(e_tr)
    # G is public: the attacker runs it on its own photos and inverts it by least squares.
    g_inv_te = numpy_mlp(f_te, fit_linear_student(f_tr, u_tr))
    it = ident[te]
    blackbox = {
        "raw: cosine": reidentify(u_te, u_te, it),
        "raw: head trained on raw": reidentify(head_features(h_raw, u_te), head_features(h_raw, u_te), it),
        "xnn-d intermediate f: cosine of f": reidentify(f_te, f_te, it),
        "xnn-d intermediate f: head trained through G": reidentify(
            head_features(h_f, f_te), head_features(h_f, f_te), it
        ),
        "xnn-d intermediate f: cosine of an affine inverse of G": reidentify(g_inv_te, g_inv_te, it),
        "xnn-d stored, key withheld: head through S(G)": reidentify(
            head_features(h_e, templates_te), head_features(h_e, e_te), it
        ),
        "xnn-d stored, key withheld: cosine vs S(G(photo))": reidentify(templates_te, e_te, it),
        "xnn-d stored, key leaked (S leaked): cosine": reidentify(e_te, e_te, it),
        "xnn-d stored, key leaked: head through S(G)": reidentify(
            head_features(h_e, e_te), head_features(h_e, e_te), it
        ),
    }
    figures["blackbox_rank1"] = blackbox

    speed = {
        name: throughput(create_protector(name, key=key, dim=128), raw) for name in ("xnn", "xnn-d")
    }
    figures["speed"] = speed

    table("Utility on test people (lfw-dev, held out)", ["scheme", "10-fold acc", "TAR@1e-3", "rank-1", "D_sys"], util_rows)
    table(
        "Known-pair attacker: rank-1 of mapped leaked templates",
        ["scheme", "naive", *(f"linear n={n}" for n in sizes), *(f"MLP n={n}" for n in sizes), "MLP all"],
        known_rows,
    )
    table(f"D_sys across two keys, {args.dsys_pairs} key pairs (same pairs for every scheme)",
          ["scheme", "mean", "min", "max"],
          [[k, v["mean"], v["min"], v["max"]] for k, v in dsys_keys.items()])
    table("Black-box attacker (paper): rank-1 re-identification of test people", ["attacker", "rank-1"],
          list(blackbox.items()))
    table("Throughput (one thread)", ["scheme", "protect/s", "score 100 x all (s)"],
          [[k, v["protect_per_s"], v["score_100x_all_s"]] for k, v in speed.items()])
    write_results("xnnd_eval", figures, command="python benchmarks/xnnd_eval.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
