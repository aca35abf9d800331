"""The FastAPI application: `create_app(settings)`; `advplugin serve` runs it with uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advplugin import __version__
from advplugin.he import HEParams
from advplugin.service.blind_service import max_request_bytes
from advplugin.service.deps import single_form_values
from advplugin.service.errors import CatchAll, error_response, install_error_handlers
from advplugin.service.metrics import Metrics, RequestMetrics, metrics_endpoint
from advplugin.service.routes import blind, compreface, recognition, subjects, system
from advplugin.service.state import ServiceState
from advplugin.settings import Settings

DESCRIPTION = """
Face recognition on **protected templates** only. Every face embedding is turned into a
protected template with the server's secret key (or on the client, in template mode) before
it is stored or searched; responses carry names, boxes and similarities, never vectors.

Authenticate with the `x-api-key` header (`advplugin db create-api-key`).
Errors share one envelope: `{"error": {"code": "...", "message": "..."}}` (on the CompreFace
routes under `/api/v1`: CompreFace's `{"message", "code"}`, with that `error` object beside).
"""

# multipart framing around the largest allowed file
_MULTIPART_OVERHEAD = 64 * 1024
#: Bodies of every route that takes no upload and no templates (GET, DELETE, ...).
_SMALL_BODY = 64 * 1024
#: Per template in JSON: 24 bytes per value ("-0.12345678901234567, "), plus a subject of up
#: to 255 characters written as \uXXXX escapes and the item's framing.
_TEMPLATE_VALUE_BYTES = 24
_TEMPLATE_ITEM_BYTES = 255 * 6 + 64


def body_limits(settings: Settings, template_dim: int) -> dict[str, int]:
    """The largest body each route can legitimately need, by path (others: `_SMALL_BODY`).
    Per route, so a template request is refused before FastAPI parses it when it cannot
    hold `max_templates_per_request` templates (a 9 MB JSON body once cost 160 MB of RSS to
    parse before its template count was checked), and an image upload is bounded by
    `max_upload_bytes`."""
    upload = settings.max_upload_bytes + _MULTIPART_OVERHEAD
    per_template = template_dim * _TEMPLATE_VALUE_BYTES + _TEMPLATE_ITEM_BYTES
    templates = settings.max_templates_per_request * per_template + _SMALL_BODY
    # Blind mode: `dim` ciphertexts of a fixed size, plus the header (subjects of a block).
    blind = max_request_bytes(HEParams(dim=template_dim)) if settings.mode == "blind" else _SMALL_BODY
    return {
        "/enroll": upload, "/identify": upload, "/verify": upload,
        "/enroll/templates": templates, "/identify/templates": templates,
        "/blind/enroll": blind, "/blind/identify": blind,
    }


class BodySizeLimit:
    """Rejects request bodies over their route's limit with 413 before they are parsed: by
    Content-Length when given, by counting the stream otherwise (chunked uploads). The
    limits are computed on the first request, from the running service's settings and the
    dimension of the templates it serves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.limits: dict[str, int] | None = None

    def limit(self, scope: Scope) -> int:
        if self.limits is None:
            service: ServiceState = scope["app"].state.service
            self.limits = body_limits(service.settings, service.protection.expected.output_dim)
        path = scope["path"].rstrip("/") or "/"
        found = self.limits.get(path) or compreface.body_limit(
            path, scope["app"].state.service.settings.max_upload_bytes, _MULTIPART_OVERHEAD
        )
        return found or _SMALL_BODY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = f"request body is larger than {limit} bytes"
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error_response(scope["path"], 413, "too_large", too_large)(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # An HTTPException: FastAPI re-raises it from its body parsing (anything
                # else becomes its 400 "error parsing the body"), and the app's handler
                # answers it with the 413 envelope.
                raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)


class BodyTimeout:
    """Bounds the time from a request's headers to the end of its body by
    `settings.body_timeout_s`: a client that sends headers with a Content-Length and then
    nothing (or trickles the body) held its connection and request open for ever, the
    server waiting in `receive()`. Past the deadline the waiting `receive()` raises an
    HTTPException 408 with `Connection: close`, which the app answers in the API family's
    error shape, and the server closes the connection. Only the body is timed: a receive
    after it (waiting for a disconnect) is left alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = float(scope["app"].state.service.settings.body_timeout_s)
        deadline = asyncio.get_running_loop().time() + timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Raised inside the body parsing, like BodySizeLimit's 413 (see there).
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {timeout:g} s",
                    headers={"connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


def create_app(settings: Settings | None = None, *, state: ServiceState | None = None) -> FastAPI:
    """The app; `state` is an already started `ServiceState` (so `advplugin serve` can report
    a bad configuration before binding the port without starting everything twice)."""
    settings = state.settings if state is not None else settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = state if state is not None else ServiceState.start(settings)
        try:
            yield
        finally:
            app.state.service.close()

    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc load their scripts from
    # assets shipped in the package, not from a CDN (blank pages on an offline deployment).
    app = FastAPIOffline(
        title="advplugin", version=__version__, description=DESCRIPTION, lifespan=lifespan,
        # Every route of both APIs: a form field given twice is refused (`deps`).
        dependencies=[Depends(single_form_values)],
    )
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(recognition.router)
    app.include_router(subjects.router)
    app.include_router(blind.router)
    app.include_router(compreface.router)  # CompreFace's API (docs/compreface.md)
    # Prometheus text format; not in the OpenAPI schema (not part of the API clients use).
    app.state.metrics = Metrics()
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    app.add_middleware(BodyTimeout)
    app.add_middleware(BodySizeLimit)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(CatchAll)  # added last: the outermost of ours
    return app
