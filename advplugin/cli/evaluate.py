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
        metavar="NAME[:KEY=VALUE,...]",
        help="registered protection scheme, repeatable: one report row each, beside the `none` "
        "baseline (always added); options after a colon are that row's (e.g. "
        "`--scheme advface --scheme advface:version=2`); required unless --threats api-client",
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
    p.add_argument(
        "--api-client",
        action="store_true",
        help="also run the API client's threat (issue 21): the service app in process (sealed "
        "SQLite, FAISS, `xnn`) with the first photo of every test person enrolled, attacked "
        "through its answers by a key that sends the train people's photos (least squares, "
        "look-alike centroid, boundary walk; exact-score, decisions-unbudgeted and default "
        "policies), and the cameras' identification of the other photos per policy",
    )
    p.add_argument(
        "--threats",
        choices=("all", "api-client"),
        default="all",
        help="`api-client`: only the API client's threat (implies --api-client; needs no "
        "--scheme): the shared parts it needs are computed as a full run does (decoder on raw "
        "embeddings: same recipe and seed, cached), and its result is merged into --out's "
        "report.json under `score_oracle` (report.md and figures re-rendered)",
    )
    p.add_argument(
        "--api-client-queries",
        metavar="N,N,...",
        help="query counts of the API client's threat (default 100,300,1000,3000,10000; "
        "--quick 20,50,100)",
    )
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
    from advplugin.evaluation.harness import (
        EvalConfig,
        SchemeSpec,
        run_api_client_only,
        run_evaluation,
    )
    from advplugin.keys import load_key

    only_api_client = args.threats == "api-client"
    if not args.scheme and not only_api_client:
        raise ValueError("--scheme is required (at least one), unless --threats api-client")
    api_client = None
    if args.api_client or only_api_client:
        from advplugin.cli.api_client import InProcessApiClient

        api_client = InProcessApiClient()
    queries = None
    if args.api_client_queries:
        queries = tuple(int(q) for q in args.api_client_queries.split(",") if q.strip())
        if not queries or min(queries) <= 0:
            raise ValueError("--api-client-queries needs positive counts, e.g. 100,1000")
    decoder = DecoderConfig() if args.epochs is None else DecoderConfig(epochs=args.epochs)
    common = parse_options(args.option)
    schemes = []
    for item in args.scheme or []:
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
        api_client=api_client,
        api_client_queries=queries,
    )
    if only_api_client:
        report = run_api_client_only(config)
        seconds = report["score_oracle"]["seconds"]  # type: ignore[index]
    else:
        report = run_evaluation(config)
        seconds = report["seconds"]
    print(f"wrote {args.out / 'report.md'} ({sum(seconds.values()):.0f} s)")  # type: ignore[union-attr]
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
