"""`advplugin` command line.

Each command lives in its own module with a `register(subparsers)` function; heavy imports
(dlib, torch, faiss) happen inside the command so that `--help` is instant.

Errors: commands raise, they do not print-and-exit nor re-wrap. `main` catches once: an
`advplugin.errors.AdvpluginError` (and the few builtin errors that mean bad input) becomes one
line on stderr, without a traceback, and the exit code of its kind (`EXIT_CODES`, listed in
`--help`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from advplugin.errors import (
    AdvpluginError,
    ConfigurationError,
    InvalidInputError,
    KeyMaterialError,
    NotFoundError,
    RemoteError,
)

#: Exit codes by kind of error, first match wins: (kinds, code, what it means). A
#: `MasterKeyError` is a configuration error (3) before it is key material (5). The builtin
#: errors of 2 are what commands raise for their own arguments (and `open` for files).
EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((InvalidInputError, ValueError, FileNotFoundError, FileExistsError, PermissionError), 2,
     "invalid input: an argument, file or value (also a usage error)"),
    ((ConfigurationError,), 3,
     "configuration: a setting, a key or store missing or wrong, a schema to upgrade"),
    ((NotFoundError,), 4, "not found: a subject, collection or API key named"),
    ((KeyMaterialError,), 5, "sealed data that fails authentication: tampered, or its subject erased"),
    ((RemoteError,), 6, "the service answered with an error, or could not be reached"),
    ((AdvpluginError,), 1, "any other error of advplugin"),
)
#: Not errors: a check that ran and failed (a verify below --min-agreement, an invalid
#: source, templates left under the old key), and an interrupt (Ctrl-C).
CHECK_FAILED, INTERRUPTED = 1, 130


def exit_codes_help() -> str:
    """The exit codes, as `--help` lists them (built from `EXIT_CODES`: they cannot drift)."""
    kinds = [(code, what) for _, code, what in EXIT_CODES[:-1]]
    rows = [(0, "success"), (CHECK_FAILED, f"a check failed (e.g. a verify), or {EXIT_CODES[-1][2]}"),
            *kinds, (INTERRUPTED, "interrupted")]
    return "exit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in rows)


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
        epilog=exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"advplugin {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        code = next((code for kinds, code, _ in EXIT_CODES if isinstance(e, kinds)), None)
        if code is None:
            raise  # a bug: its traceback is what to report
        # One clear line, no traceback (whose frames could show data); an error's notes
        # (`add_note`: what a command adds, e.g. `--upgrade`) follow its message.
        message = " ".join([str(e), *getattr(e, "__notes__", ())])
        print(f"advplugin {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
