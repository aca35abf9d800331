"""`advplugin keygen`: create a secret key file (mode 0600)."""

from __future__ import annotations

import argparse

from advplugin.keys import write_key


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="create a secret key file (mode 0600)",
        description="Create a new random key in a file only its owner can read. "
        "Prints the key id, never the key.",
    )
    p.add_argument("--out", required=True, help="path of the key file to create")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = write_key(args.out, overwrite=args.force)
    print(f"wrote key {args.out} (key id {key.key_id})")
    return 0
