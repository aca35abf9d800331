"""Logging of the service: plain text or one JSON object per line (`ADVPLUGIN_LOG_FORMAT`).

The access log is the service's own (`advplugin.access`, written by `errors.CatchAll`), not
uvicorn's: uvicorn logs the raw path and query string, in which a subject's name (a person's
name: `/subjects/Ada Lovelace`) or anything a client put in a query would land in the log.
Ours logs the route *template* (`/subjects/{name}`), the status, the duration and the
request id, which is also the `x-request-id` response header and is named in a 500's message,
so an operator can find the one line that belongs to a client's report.

In the JSON format every line is JSON from the first one: `advplugin serve` configures the
root logger before anything else runs (settings, start-up checks, uvicorn), uvicorn's loggers
only propagate to it, Python warnings (Pillow's DecompressionBombWarning, numpy's) go through
logging (`logging.captureWarnings`) instead of being printed as two plain lines, extraction
worker processes configure theirs the same way, and the server's own answer to a request it
cannot parse is JSON too (`advplugin.service.server`). What is still printed (the start-up
notices: a key file created, a key in the backed-up folder; any library's print) is turned
into log records line by line (`PrintedLines`, on stdout and stderr). Before, 28 of 39 lines
of a JSON run were plain text.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime

from starlette.types import Scope

#: Attributes of a LogRecord that a JSON line carries as fields when set (`extra=`).
_FIELDS = ("request_id", "method", "route", "status", "duration_ms", "error")

access_log = logging.getLogger("advplugin.access")

#: The route of requests that matched none (404s of arbitrary paths): never the path itself.
UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The template of the route that served the request (`/subjects/{name}`), once the
    router has run; `UNMATCHED` otherwise. Logs and metric labels use this, never the path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if template:
        return template
    # A plain Starlette route (/metrics, /docs) matched: FastAPI's router does not record it
    # in the scope, but without path parameters its path is its template.
    if scope.get("endpoint") is not None and not scope.get("path_params"):
        return str(scope.get("path", UNMATCHED))
    return UNMATCHED


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the
    request fields of access and error lines. No exception text or traceback is ever
    written (either could echo request content); only the exception's type, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, ensure_ascii=False, default=str)


class PrintedLines(io.TextIOBase):
    """A text stream (for `sys.stdout` / `sys.stderr` in the JSON format) that logs each
    line written to it as one record of `logger`: the service's start-up notices are
    `print`ed (so an operator sees them whatever the log level), and so is whatever a library
    prints; in a JSON log each was a plain line. WARNING, so they stay visible at every level
    as printed lines were. A line written while a record is being handled (logging reporting
    its own failure) goes to the process's stderr as it is, never round again."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        super().__init__()
        self._logger, self._level = logger, level
        self._partial = ""
        self._lock = threading.RLock()
        self._inside = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._inside, "active", False):
            return _raw_stderr().write(text)
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            self._inside.active = True
            try:
                for line in lines:
                    if line.strip():
                        self._logger.log(self._level, line.rstrip())
            finally:
                self._inside.active = False
        return len(text)


def _raw_stderr() -> io.TextIOBase:
    """The process's own stderr, where the log handler writes (never a `PrintedLines`)."""
    return sys.__stderr__ or sys.stderr  # type: ignore[return-value]


def configure_logging(level: str | int, fmt: str) -> None:
    """Root logging for `advplugin serve` and its worker processes (uvicorn's loggers
    propagate to it), Python warnings included; in the JSON format also what is printed."""
    handler = logging.StreamHandler(_raw_stderr())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    if fmt == "json":
        if not isinstance(sys.stdout, PrintedLines):
            sys.stdout = PrintedLines(logging.getLogger("advplugin.stdout"))
        if not isinstance(sys.stderr, PrintedLines):
            sys.stderr = PrintedLines(logging.getLogger("advplugin.stderr"))


def log_format_from_env() -> str:
    """`ADVPLUGIN_LOG_FORMAT` as `Settings.log_format` will read it (variable names are not
    case-sensitive), for the logging configured before the settings are parsed, so even a
    refused setting is reported as a JSON line."""
    for name, value in os.environ.items():
        if name.upper() == "ADVPLUGIN_LOG_FORMAT":
            return "json" if value.strip().lower() == "json" else "text"
    return "text"
