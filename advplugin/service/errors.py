"""One error shape per API family, for every status: the native envelope
`{"error": {"code": ..., "message": ...}}`, and on CompreFace's routes (`/api/v1/...`)
CompreFace's `{"message": ..., "code": <number>}` with the envelope's `error` object beside
it. `error_response` builds every error answer the app gives, from the exception handlers,
the middleware that answer before routing (413 by Content-Length, 408) and `CatchAll`'s 500,
and picks the shape by the request's path: a rule per answer site once let the 413s and 500s
of CompreFace routes out in the native shape.

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

from advplugin.errors import AdvpluginError
from advplugin.service.logs import access_log, route_template

log = logging.getLogger("advplugin.service")


class ServiceError(AdvpluginError):
    """An expected failure with an HTTP status, a stable code and a safe message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The native error envelope (`error_response` picks it, or CompreFace's shape, by path)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


#: CompreFace's routes (`advplugin.service.routes.compreface`), whose errors take CompreFace's shape.
COMPREFACE_PREFIX = "/api/v1"
#: CompreFace's numeric error codes (its `ExceptionCode`), by the native error code; 0 (its
#: "undefined") for what CompreFace has no number for.
COMPREFACE_CODES = {
    "no_face": 28, "unknown_subject": 42, "image_not_found": 11, "subject_exists": 43,
    "invalid_request": 26, "invalid_image": 21, "unsupported_plugin": 36, "unauthorized": 20,
}


def is_compreface(path: str) -> bool:
    return path == COMPREFACE_PREFIX or path.startswith(COMPREFACE_PREFIX + "/")


def compreface_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """CompreFace's error shape: its number for the native `code`, 400 where the native API
    says 422 (CompreFace answers validation problems with 400), and the native envelope's
    `error` object beside, so a client of either API reads it."""
    content = {"message": message, "code": COMPREFACE_CODES.get(code, 0), "error": {"code": code, "message": message}}
    return JSONResponse(content, status_code=400 if status == 422 else status, headers=headers)


def error_response(
    path: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error answer in the shape of the API family `path` belongs to."""
    if is_compreface(path):
        return compreface_error(status, code, message, headers)
    return envelope(status, code, message, headers)


_HTTP_CODES = {
    401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    413: "too_large",
}


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
    async def _service_error(request: Request, e: ServiceError) -> JSONResponse:
        return error_response(request.scope["path"], e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(request.scope["path"], 422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:
            # FastAPI's answer to a body it could not parse (malformed multipart, JSON that
            # is not UTF-8 or nests too deep): the documented 422, never a bare 400.
            return error_response(request.scope["path"], 422, "invalid_request", "the request body could not be parsed")
        headers = {k.lower(): v for k, v in (getattr(e, "headers", None) or {}).items()}
        if e.status_code == 405:
            headers["allow"] = _allowed_methods(request)
        code = _HTTP_CODES.get(e.status_code, "http_error")
        return error_response(request.scope["path"], e.status_code, code, str(e.detail), headers or None)


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
                response = error_response(
                    scope.get("path", ""), 500, "internal_error", f"internal error (request id {request_id})"
                )
                await response(scope, receive, send_with_id)
        method, route = scope.get("method", ""), route_template(scope)
        duration_ms = round((time.perf_counter() - start) * 1000, 1)
        access_log.info("%s %s %s %.1fms %s", method, route, status, duration_ms, request_id, extra={
            "request_id": request_id, "method": method, "route": route, "status": status,
            "duration_ms": duration_ms,
        })
