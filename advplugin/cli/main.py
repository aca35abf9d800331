"""`advplugin` command line.

Each command lives in its own module with a `register(subparsers)` function; heavy imports
(dlib, torch, faiss) happen inside the command so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that contribute commands, in the order `--help` lists them.
COMMAND_MODULES = [
    "advplugin.cli.embed",
    "advplugin.cli.evaluate",
    "advplugin.cli.db",
    "advplugin.cli.keys",
    "advplugin.cli.listing",
    "advplugin.cli.serve",
    "advplugin.cli.migrate",
    "advplugin.cli.protect",
    "advplugin.cli.verify",
    "advplugin.cli.blind",
    "advplugin.cli.train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advplugin",
        description="Protect face embeddings: extract, protect, match and evaluate templates.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        # Expected user errors: one clear line, no traceback (which could show data).
        print(f"advplugin {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"advplugin {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
