"""`advplugin evaluate` (utility and attacks, one report) and `advplugin evaluate-split`."""

from __future__ import annotations

import argparse
from pathlib import Path

from advplugin.evaluation.paths import default_cache_dir
from advplugin.evaluation.recipe import AttackRecipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a scheme's accuracy and the attacks on its templates; writes a report",
        description="Utility (10-fold verification, TAR@FAR, rank-1) raw vs protected, and the "
        "threat model's attacks in ISO/IEC 30136 terms (success attack rates at FMR 1e-3 and "
        "1e-2): reconstruction judged type I (by dlib) and type II (by --scorer), naive and "
        "adaptive; template inversion; linkability across keys; key recovery. Every attack is "
        "trained on the train folder's people and measured on the test folder's. Writes "
        "report.json (after every scheme row), report.md and PNG figures to --out. Folders are "
        "laid out <identity>/<image>; see `evaluate-split`.",
    )
    p.add_argument(
        "--scheme",
        action="append",
        required=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="registered protection scheme, repeatable: one report row each, beside the `none` "
        "baseline (always added); options after a colon are that row's (e.g. "
        "`--scheme advface --scheme advface:version=2`)",
    )
    p.add_argument("--key", help="key file (default: an ephemeral key generated for the run)")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="scheme option for every --scheme, repeatable",
    )
    p.add_argument(
        "--train-images", required=True, type=Path, help="folder of the attacker's people"
    )
    p.add_argument("--test-images", required=True, type=Path, help="folder of the people attacked")
    p.add_argument(
        "--pairs", type=Path, help="LFW-format pairs file (default: generate pairs in LFW's format)"
    )
    p.add_argument(
        "--extractor", default="dlib", help="registered extractor whose embeddings are protected"
    )
    p.add_argument(
        "--scorer", type=Path, help="ArcFace-style ONNX model that judges reconstructions"
    )
    p.add_argument(
        "--scorer-mean", type=float, default=0.0, help="scorer input mean (0 for mobileface)"
    )
    p.add_argument(
        "--scorer-std", type=float, default=1.0, help="scorer input std (1 for mobileface)"
    )
    p.add_argument(
        "--embeddings-cache",
        type=Path,
        help="seed .npz (embedding-set layout) from the same extractor",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="content-hash cache folder"
    )
    p.add_argument("--no-cache", action="store_true", help="compute everything, write no cache")
    p.add_argument("--epochs", type=int, help="decoder training epochs (default 6; --quick 2)")
    p.add_argument(
        "--decoder-identity-weight",
        type=float,
        default=AttackRecipe().identity_weight,
        help="weight of the decoders' identity loss through dlib (default %(default)s, with flip "
        "augmentation and early stopping: issue 15's attacker); 0: the L1-only decoder of the "
        "earlier reports (no identity loss, no flip, no early stopping)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)"
    )
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument(
        "--quick", action="store_true", help="a small run (few people, tiny decoder) for tests"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)

    s = sub.add_parser(
        "evaluate-split",
        help="split an image folder by identity into train/ and test/ folders of symlinks",
        description="Deterministic by a hash of each identity's name, so the same person always "
        "lands on the same side; writes symlinks only, never copies images.",
    )
    s.add_argument("--images", required=True, type=Path, help="folder laid out <identity>/<image>")
    s.add_argument("--out", required=True, type=Path, help="creates OUT/train and OUT/test")
    s.add_argument("--test-fraction", type=float, default=0.5)
    s.set_defaults(func=run_split)


def run(args: argparse.Namespace) -> int:
    from advplugin.cli.common import parse_options
    from advplugin.evaluation.decoder import DecoderConfig
    from advplugin.evaluation.harness import EvalConfig, SchemeSpec, run_evaluation
    from advplugin.keys import load_key

    decoder = DecoderConfig() if args.epochs is None else DecoderConfig(epochs=args.epochs)
    common = parse_options(args.option)
    schemes = []
    for item in args.scheme:
        name, _, extra = item.partition(":")
        own = parse_options([o for o in extra.split(",") if o])
        schemes.append(SchemeSpec(name, {**common, **own}, label=item))
    weight = args.decoder_identity_weight
    if weight < 0:
        raise ValueError("--decoder-identity-weight must be >= 0")
    config = EvalConfig(
        schemes=schemes,
        key=load_key(args.key) if args.key else None,
        train_images=args.train_images,
        test_images=args.test_images,
        pairs=args.pairs,
        extractor=args.extractor,
        scorer=args.scorer,
        scorer_mean=args.scorer_mean,
        scorer_std=args.scorer_std,
        cache_dir=None if args.no_cache else args.cache_dir,
        seed_embeddings=args.embeddings_cache,
        quick=args.quick,
        decoder=decoder,
        recipe=AttackRecipe(identity_weight=weight) if weight > 0 else AttackRecipe.l1_only(),
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        progress=not args.no_progress,
        command=_command_line(),
    )
    report = run_evaluation(config)
    print(f"wrote {args.out / 'report.md'} ({sum(report['seconds'].values()):.0f} s)")  # type: ignore[union-attr]
    return 0


def _command_line() -> str:
    """How this run was started, for the report's regeneration line."""
    import shlex
    import sys

    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "advplugin" else None
    return "advplugin " + shlex.join(argv) if argv else "advplugin evaluate (called in process)"


def run_split(args: argparse.Namespace) -> int:
    from advplugin.evaluation.data import split_identities

    counts = split_identities(args.images, args.out, test_fraction=args.test_fraction)
    print(
        f"train: {counts['train_identities']} people, {counts['train_images']} images; "
        f"test: {counts['test_identities']} people, {counts['test_images']} images ({args.out})"
    )
    return 0
