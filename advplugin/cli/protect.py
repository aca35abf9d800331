"""`advplugin protect`: raw embedding file -> protected template file."""

from __future__ import annotations

import argparse

from advplugin.cli.common import add_option_argument, parse_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "protect",
        help="protect an npz of raw embeddings with a scheme and key",
        description="Writes the same npz layout with protected templates in `embedding` and the "
        "protector metadata (scheme, version, key id, dimensions) in `protection`.",
    )
    p.add_argument("--scheme", required=True, help="registered scheme (see `advplugin list`)")
    p.add_argument("--key", help="key file (from `advplugin keygen`); required by keyed schemes")
    add_option_argument(p, "--option", "scheme")
    p.add_argument("--in", dest="input", required=True, help="input .npz of raw embeddings")
    p.add_argument("--out", required=True, help="output .npz of protected templates")
    p.set_defaults(func=run)


def build_protector(scheme: str, key_path: str | None, dim: int, options: dict[str, object]):
    """The protector the CLI arguments describe; loads the key file only when one is given."""
    from advplugin.keys import load_key
    from advplugin.protectors import create_protector

    key = load_key(key_path) if key_path else None
    return create_protector(scheme, key=key, dim=dim, **options)


def run(args: argparse.Namespace) -> int:
    from advplugin.embedding_files import EmbeddingSet, load_embedding_set, save_embedding_set

    data = load_embedding_set(args.input)
    if data.protection is not None:
        raise ValueError(
            f"{args.input} already holds protected templates ({data.protection['scheme']})"
        )
    protector = build_protector(
        args.scheme, args.key, data.embedding.shape[1], parse_options(args.option)
    )
    templates = protector.protect(data.embedding)
    save_embedding_set(
        args.out,
        EmbeddingSet(
            templates,
            data.path,
            data.identity,
            data.detected,
            protection=protector.metadata.as_dict(),
        ),
    )
    print(f"protected {len(templates)} embeddings with {protector!r} -> {args.out}")
    return 0
