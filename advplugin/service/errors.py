"""One error envelope for every failure: `{"error": {"code": ..., "message": ...}}`.

Validation errors are rewritten without pydantic's `input` field, which would otherwise echo
request content (a template vector, an API key) back to the caller and into logs.

Unexpected exceptions are answered by `CatchAll` rather than by an `Exception` handler:
Starlette re-raises after such a handler, so uvicorn printed the full traceback (whose
frames can hold request data) and dropped the keep-alive connection.
"""

from __future__ import annotations

import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advplugin.service.logs import access_log, route_template

log = logging.getLogger("advplugin.service")


class ServiceError(Exception):
    """An expected failure with an HTTP status, a stable code and a safe message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route that matched the path: GET /subjects/{name} hid DELETE). Probed per method, as a
    request would be routed, so included routers count too."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError) -> JSONResponse:
        return envelope(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return envelope(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:
            # FastAPI's answer to a body it could not parse (malformed multipart, JSON that
            # is not UTF-8 or nests too deep): the documented 422, never a bare 400.
            return envelope(422, "invalid_request", "the request body could not be parsed")
        headers = {k.lower(): v for k, v in (getattr(e, "headers", None) or {}).items()}
        if e.status_code == 405:
            headers["allow"] = _allowed_methods(request)
        code = _HTTP_CODES.get(e.status_code, "http_error")
        return envelope(e.status_code, code, str(e.detail), headers or None)


class CatchAll:
    """Outermost middleware: gives every request an id (`x-request-id`), writes the access
    log line (route template, status, duration, request id: never the path or the query),
    and answers an unexpected exception with the 500 envelope, logging its type and the
    request id only, never its message or traceback (either could echo request content),
    and without re-raising, so the connection stays open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            error = type(e).__name__
            log.error("internal error %s (request id %s)", error, request_id,
                      extra={"request_id": request_id, "error": error})
            if not status:
                response = envelope(500, "internal_error", f"internal error (request id {request_id})")
                await response(scope, receive, send_with_id)
        method, route = scope.get("method", ""), route_template(scope)
        duration_ms = round((time.perf_counter() - start) * 1000, 1)
        access_log.info("%s %s %s %.1fms %s", method, route, status, duration_ms, request_id, extra={
            "request_id": request_id, "method": method, "route": route, "status": status,
            "duration_ms": duration_ms,
        })
