"""Logging of the service: plain text or one JSON object per line (`ADVPLUGIN_LOG_FORMAT`).

The access log is the service's own (`advplugin.access`, written by `errors.CatchAll`), not
uvicorn's: uvicorn logs the raw path and query string, in which a subject's name (a person's
name: `/subjects/Ada Lovelace`) or anything a client put in a query would land in the log.
Ours logs the route *template* (`/subjects/{name}`), the status, the duration and the
request id, which is also the `x-request-id` response header and is named in a 500's message,
so an operator can find the one line that belongs to a client's report.
"""

from __future__ import annotations

import json
import logging
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


def configure_logging(level: str, fmt: str) -> None:
    """Root logging for `advplugin serve` (uvicorn's loggers propagate to it)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
