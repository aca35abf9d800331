"""`advplugin verify-pairs`: LFW-protocol verification accuracy of raw or protected embeddings."""

from __future__ import annotations

import argparse
import json

from advplugin.cli.common import add_option_argument, parse_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify-pairs",
        help="10-fold verification accuracy and TAR@FAR=1e-3 on an LFW-format pairs file",
        description="Scores the pairs of a pairs.txt (LFW format; `Name i` = Name/Name_{i:04d}.jpg) "
        "with raw embeddings, or with templates protected by --scheme/--key on the fly. Accuracy "
        "is LFW's 10-fold protocol (threshold chosen on 9 folds, tested on the 10th), as a "
        "fraction; TAR@FAR=1e-3 uses all genuine and all impostor pairs among the images the "
        "pairs file mentions.",
    )
    p.add_argument("--embeddings", required=True, help=".npz from `advplugin embed` (or `protect`)")
    p.add_argument("--pairs", required=True, help="pairs file in LFW's pairs.txt format")
    p.add_argument("--scheme", help="protect the embeddings with this scheme before scoring")
    p.add_argument("--key", help="key file for --scheme")
    add_option_argument(p, "--option", "scheme")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advplugin.cli.protect import build_protector
    from advplugin.embedding_files import load_embedding_set
    from advplugin.evaluation.pairs_report import cosine_scores, verification_report

    data = load_embedding_set(args.embeddings)
    dim = data.embedding.shape[1]
    if args.scheme:
        if data.protection is not None:
            raise ValueError(f"{args.embeddings} is already protected; drop --scheme")
        protector = build_protector(args.scheme, args.key, dim, parse_options(args.option))
        templates = protector.protect(data.embedding)
        score_fn = protector.score
        label = protector.metadata.as_dict()
    elif data.protection is not None:
        meta = data.protection
        protector = build_protector(
            str(meta["scheme"]), args.key, int(meta["input_dim"]), parse_options(args.option)
        )
        if protector.metadata.key_id != meta["key_id"]:
            raise ValueError("--key does not match the key id recorded in the protected file")
        templates, score_fn, label = data.embedding, protector.score, meta
    else:
        templates, label = data.embedding, {"scheme": "raw"}
        score_fn = cosine_scores
    report = {
        **verification_report(templates, data.path, data.identity, args.pairs, score_fn),
        "protection": label,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{label['scheme']}: accuracy {report['accuracy']:.4%} ± {report['accuracy_std']:.4%}, "
            f"TAR@FAR=1e-3 {report['tar_at_far_1e-3']:.4%} ({report['pairs']} pairs)"
        )
    return 0
