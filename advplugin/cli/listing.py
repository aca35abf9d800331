"""`advplugin list`: what is registered, so config values can be checked before use."""

from __future__ import annotations

import argparse
import inspect
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="list registered protection schemes and extractors",
        description="Lists the names accepted by --scheme and --extractor, each with the first "
        "line of its documentation.",
    )
    p.set_defaults(func=run)


def _summary(factory: object) -> str:
    doc = inspect.getdoc(sys.modules[factory.__module__]) or ""
    return doc.splitlines()[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    from advplugin.adapters import EXTRACTORS
    from advplugin.protectors import SCHEMES

    for title, registry in (("schemes", SCHEMES), ("extractors", EXTRACTORS)):
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:12s} {_summary(registry.factory(name))}")
    return 0
