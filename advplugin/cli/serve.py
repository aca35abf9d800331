"""`advplugin serve`: run the REST service with uvicorn on embedded defaults or ADVPLUGIN_*."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the REST service (/enroll, /identify, ...)",
        description="Run the service. With no options it uses ./.advplugin/data (SQLite gallery, "
        "FAISS snapshots, a key file created 0600 on first start), the dlib extractor and the "
        "best protection scheme available. Every option can also be set as ADVPLUGIN_<NAME>.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--data-dir", type=Path, help="data folder (default ./.advplugin/data)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data folder)")
    p.add_argument("--key-file", type=Path, help="secret key file (default: DATA_DIR/key)")
    p.add_argument(
        "--previous-key-file", type=Path,
        help="during a key rotation: the old key (then --key-file is the new one)",
    )
    p.add_argument("--mode", choices=["images", "templates"], help="images (default) or templates")
    p.add_argument("--scheme", help="protection scheme (default: best available)")
    # Not `choices`: the backends register when the gallery is imported, which the CLI defers;
    # Settings checks the name and lists the registered ones. --index-kind: the old spelling.
    p.add_argument(
        "--index-backend", "--index-kind", dest="index_backend",
        help="search index backend: faiss-flat (default), faiss-ivf, faiss-hnsw (or flat, ivf, hnsw), milvus",
    )
    p.add_argument("--log-level", default="info")


def build_settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from advplugin.settings import Settings

    overrides = {
        name: getattr(args, name)
        for name in (
            "host", "port", "data_dir", "database_url", "key_file", "previous_key_file", "mode",
            "scheme",
        )
        if getattr(args, name, None) is not None
    }
    if getattr(args, "index_backend", None) is not None:
        # A dict, not an IndexConfig: merged with ADVPLUGIN_INDEX__* rather than replacing it.
        overrides["index"] = {"backend": args.index_backend}
    return Settings(**overrides)


def _refuse(message: str, fmt: str) -> int:
    """A start refused: one line, in the log format (a JSON line when it is JSON)."""
    if fmt == "json":
        logging.getLogger("advplugin.serve").error("advplugin serve: error: %s", message)
    else:
        print(f"advplugin serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # Logging first, before the settings, the start-up checks and uvicorn log anything (and
    # before the imports below can warn): in the JSON format every line is JSON from the first.
    from advplugin.service.logs import configure_logging, log_format_from_env

    fmt = log_format_from_env()
    configure_logging(args.log_level, fmt)

    import uvicorn
    from pydantic import ValidationError

    from advplugin.errors import AdvpluginError
    from advplugin.service.app import create_app
    from advplugin.service.server import JsonErrorsProtocol
    from advplugin.service.state import ServiceState

    try:
        settings = build_settings(args)
    except ValidationError as e:  # e.g. an unknown index backend: say which exist, no traceback
        return _refuse(str(e), fmt)
    if settings.log_format != fmt:
        fmt = settings.log_format
        configure_logging(args.log_level, fmt)
    # Check the configuration before binding the port, so a bad start fails with one line (in
    # the log format, hence here and not in `cli.main`; always 2, as services have relied on).
    try:
        state = ServiceState.start(settings)
    except AdvpluginError as e:  # a ConfigurationError (schema, keys, scheme) nearly always
        return _refuse(str(e), fmt)

    app = create_app(state=state)
    # access_log off, log_config None: the service writes its own access log (route templates,
    # never paths or query strings) and uvicorn's lines go through the handler configured
    # above. JsonErrorsProtocol: uvicorn's own 400s in the service's error shape.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=False, log_config=None, http=JsonErrorsProtocol)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advplugin serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
