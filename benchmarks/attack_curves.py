"""The harness's cheaper attacks (issue 15, Build 3) for every scheme on the stored embedding
(lfw-dev dlib cache): fitted on the evaluation's train people, measured on its test people
(the identity hash of `advplugin evaluate-split`, test fraction 0.5):

    .venv/bin/python benchmarks/attack_curves.py            # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/attack_curves.py --quick    # ~2 min: fewer sizes and key pairs

- known-pair attacker (`attacks.known_pair_curve`): n = 16, 32, ..., 1024 chosen enrolments of
  train people (one photo per person first), a least-squares and an MLP map template -> raw
  embedding, then rank-1 of the test people's leaked templates among their other raw photos;
- attacker with no known pairs (`attacks.unsupervised_alignment`): the leaked gallery (first
  photo of every test person) aligned with unlabelled raw embeddings by an orthogonal map,
  PCA initialisation with sign fixing then ICP Procrustes, against photos of other people
  (train people) and against other photos of the enrolled people; same rank-1 protocol;
- linkability across two keys (`attacks.unlinkability`) over `--key-pairs` key pairs: D_sys
  (Gomez-Barrero et al.) counting every mated pair, and giving every person the same weight;
  maximal linkability (Otroshi Shahreza et al., TIFS 2023), both weightings; each with the
  estimator's floor at the same sample sizes;
- why `xnn`'s D_sys counting every mated pair is high (issue 15, Build 4): the share of mated
  pairs held by the most photographed test person, and the fix the issue proposed - centring
  on the train people's mean before `xnn` - measured the same way, with its accuracy cost
  (10-fold on the lfw-dev pairs among test people, `attacks.utility`).
Writes benchmarks/results/attack_curves.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, table, write_results

from advplugin.embedding_files import load_embedding_set
from advplugin.evaluation import attacks
from advplugin.evaluation.data import identity_in_test, restrict_pairs
from advplugin.evaluation.metrics import read_pairs
from advplugin.keys import Key
from advplugin.protectors import create_protector

SCHEMES = ("none", "xnn", "advface", "xnn-d")
LINKABILITY = (
    "d_sys", "d_sys_floor", "d_sys_per_subject", "d_sys_per_subject_floor",
    "maximal_linkability", "maximal_linkability_per_subject",
    "maximal_linkability_per_subject_floor",
)  # fmt: skip


def fixed_key(label: str) -> Key:
    """A key derived from a public label: the run is reproducible, and nothing here is secret."""
    return Key(Key(b"attack-curves".ljust(32, b"\0")).derive(label, 32))


def linkability(
    scheme: str, raw: np.ndarray, identity: np.ndarray, key_pairs: int, max_impostors: int,
    rng: np.random.Generator,
) -> dict[str, object]:
    """`attacks.unlinkability`'s measures over `key_pairs` fixed key pairs: each, mean, max."""
    link = []
    for k in range(key_pairs):
        p1 = create_protector(scheme, key=fixed_key(f"pair{k}/a"), dim=128)
        p2 = create_protector(scheme, key=fixed_key(f"pair{k}/b"), dim=128)
        u = attacks.unlinkability(
            p1.score, p1.protect(raw), p2.protect(raw), identity,
            max_impostors=max_impostors, rng=rng,
        )  # fmt: skip
        link.append({m: float(u[m]) for m in LINKABILITY})  # type: ignore[arg-type]
    return {
        "per_key_pair": link,
        "mean": {m: float(np.mean([x[m] for x in link])) for m in LINKABILITY},
        "max": {m: float(np.max([x[m] for x in link])) for m in LINKABILITY},
        "mated_pairs": int(u["mated_pairs"]),  # type: ignore[call-overload]
        "mated_subjects": int(u["mated_subjects"]),  # type: ignore[call-overload]
    }


def centring_diagnosis(
    raw: np.ndarray, ident: np.ndarray, paths: np.ndarray, tr: np.ndarray, te: np.ndarray,
    data: Path, key_pairs: int, max_impostors: int, rng: np.random.Generator,
) -> dict[str, object]:
    """What centring on a public mean (train people's mean unit embedding) before `xnn`
    would change: linkability both ways, and accuracy against raw on test people."""
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mean = unit[tr].mean(axis=0)
    centred = (unit - mean).astype(np.float32)
    ids = ident[te]
    _, counts = np.unique(ids, return_counts=True)
    pairs = counts * (counts - 1)
    protocol = restrict_pairs(read_pairs(str(data / "lfw-dev-pairs.txt")), set(map(str, paths[te])))
    none = create_protector("none", dim=128)
    accuracy = {
        label: attacks.utility(
            none.score, x[te], ids, paths[te], protocol, max_impostors=max_impostors, rng=rng
        )["verification_accuracy"]
        for label, x in (("raw", raw), ("centred", centred))
    }
    return {
        "mean_norm": float(np.linalg.norm(mean)),
        "mean_cosine_to_mean_direction": float((unit[te] @ (mean / np.linalg.norm(mean))).mean()),
        "top_person_share_of_mated_pairs": float(pairs.max() / pairs.sum()),
        "top_person_photos": int(counts.max()),
        "accuracy_raw": accuracy["raw"],
        "accuracy_centred": accuracy["centred"],
        "xnn_centred": linkability("xnn", centred[te], ids, key_pairs, max_impostors, rng),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=FACE_DATA)
    ap.add_argument("--quick", action="store_true", help="sizes 16,128,1024 and 1 key pair")
    ap.add_argument("--key-pairs", type=int, default=4)
    ap.add_argument("--max-impostors", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [16, 128, 1024] if args.quick else [16 << i for i in range(7)]
    key_pairs = 1 if args.quick else args.key_pairs
    emb = load_embedding_set(args.data / "lfw-dev-dlib128.npz")
    raw, ident = emb.embedding.astype(np.float32), emb.identity.astype(str)
    paths = emb.path.astype(str)
    te = np.array([identity_in_test(i, 0.5) for i in ident])
    tr = ~te
    probes, _ = attacks.leak_probes(ident[te])
    figures: dict[str, object] = {
        "train_images": int(tr.sum()), "test_images": int(te.sum()),
        "train_people": len(np.unique(ident[tr])), "test_people": len(np.unique(ident[te])),
        "leaked_probes": len(probes),
        "raw_rank1": attacks.identification_rate(raw[te][probes], raw[te], ident[te]),
        "chance_rank1": 1 / len(np.unique(ident[te])),
        "sizes": sizes, "key_pairs": key_pairs, "schemes": {},
    }  # fmt: skip
    for scheme in SCHEMES:
        rng = np.random.default_rng(args.seed)
        p = create_protector(scheme, key=fixed_key("pair0/a"), dim=128)
        t_tr, t_te = p.protect(raw[tr]), p.protect(raw[te])
        row: dict[str, object] = {
            "known_pairs": attacks.known_pair_curve(
                t_tr, raw[tr], ident[tr], t_te, raw[te], ident[te], sizes, rng, seed=args.seed
            ),
            "no_known_pairs": attacks.unsupervised_alignment(t_te, raw[te], ident[te], raw[tr]),
        }
        if scheme == "none":  # the true map is the identity: how far the PCA start is from it
            _, first = np.unique(ident[te], return_index=True)
            start = attacks.pca_alignment(raw[te][first], raw[tr])
            row["pca_start_trace_over_dim"] = float(np.trace(start) / start.shape[0])
        row["linkability"] = linkability(
            scheme, raw[te], ident[te], key_pairs, args.max_impostors, rng
        )
        figures["schemes"][scheme] = row  # type: ignore[index]
        print(f"{scheme}: done", flush=True)

    diagnosis = centring_diagnosis(
        raw, ident, paths, tr, te, args.data, key_pairs, args.max_impostors,
        np.random.default_rng(args.seed),
    )  # fmt: skip
    figures["centring_diagnosis"] = diagnosis
    rows = figures["schemes"]
    assert isinstance(rows, dict)
    print(
        f"\nraw rank-1 (ceiling) {figures['raw_rank1']:.3f}, chance {figures['chance_rank1']:.5f}; "
        f"{len(probes)} leaked test people"
    )
    table(
        "Known-pair attacker: rank-1 of leaked test templates after a map fitted on n pairs (linear / MLP)",
        ["n", *SCHEMES],
        [
            [n, *(f"{r['known_pairs'][i]['linear_rank1']:.3f} / {r['known_pairs'][i]['mlp_rank1']:.3f}"
                  for r in rows.values())]
            for i, n in enumerate(sizes)
        ],
    )  # fmt: skip
    table(
        "No known pairs: rank-1 after unsupervised orthogonal alignment (PCA init / after ICP)",
        ["public embeddings", *SCHEMES],
        [
            [label, *(
                f"{r['no_known_pairs'][key]['pca_rank1']:.3f} / {r['no_known_pairs'][key]['icp_rank1']:.3f}"
                if r["no_known_pairs"].get(key) else "n/a" for r in rows.values()
            )]
            for key, label in (("other_people", "other people (train)"),
                               ("same_people", "other photos of the enrolled"))
        ],
    )  # fmt: skip
    table(
        f"Linkability across two keys, mean (max) over {key_pairs} key pair(s); floor = estimator's",
        ["scheme", "D_sys all pairs", "floor", "D_sys per subject", "floor",
         "max-leakage all pairs", "max-leakage per subject", "floor"],
        [
            [s, *(f"{r['linkability']['mean'][m]:.3f} ({r['linkability']['max'][m]:.3f})"
                  if "floor" not in m else f"{r['linkability']['mean'][m]:.3f}" for m in LINKABILITY)]
            for s, r in rows.items()
        ],
    )  # fmt: skip
    cen = diagnosis["xnn_centred"]
    assert isinstance(cen, dict)
    print(
        f"\nCentring diagnosis: the most photographed test person ({diagnosis['top_person_photos']} "
        f"photos) holds {diagnosis['top_person_share_of_mated_pairs']:.1%} of the mated pairs; "
        f"mean cosine to the mean direction {diagnosis['mean_cosine_to_mean_direction']:.3f}.\n"
        f"xnn on centred embeddings: D_sys all pairs {cen['mean']['d_sys']:.3f} "
        f"(max {cen['max']['d_sys']:.3f}), per subject {cen['mean']['d_sys_per_subject']:.3f} "
        f"(floor {cen['mean']['d_sys_per_subject_floor']:.3f}); 10-fold accuracy "
        f"{diagnosis['accuracy_centred']:.4f} vs raw {diagnosis['accuracy_raw']:.4f}"
    )
    quick = " --quick" if args.quick else ""
    write_results(
        "attack_curves_quick" if args.quick else "attack_curves", figures,
        command=f".venv/bin/python benchmarks/attack_curves.py{quick}",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
