"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import json


def parse_options(pairs: list[str] | None) -> dict[str, object]:
    """`KEY=VALUE` strings -> dict; values are read as JSON when they parse (numbers, lists,
    booleans), else kept as strings, so `--option mean=0 --option channels=bgr` both work."""
    options: dict[str, object] = {}
    for item in pairs or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"option {item!r} must look like KEY=VALUE")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options


def add_option_argument(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    parser.add_argument(
        flag,
        action="append",
        metavar="KEY=VALUE",
        help=f"{what} option, repeatable (e.g. {flag} model_path=model.onnx)",
    )
