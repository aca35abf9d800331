"""The FastAPI application: `create_app(settings)`; `advplugin serve` runs it with uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advplugin import __version__
from advplugin.service import routes_recognition, routes_subjects, routes_system
from advplugin.service.errors import envelope, install_error_handlers
from advplugin.service.state import ServiceState
from advplugin.settings import Settings

DESCRIPTION = """
Face recognition on **protected templates** only. Every face embedding is turned into a
protected template with the server's secret key (or on the client, in template mode) before
it is stored or searched; responses carry names, boxes and similarities, never vectors.

Authenticate with the `x-api-key` header (`advplugin db create-api-key`).
Errors share one envelope: `{"error": {"code": "...", "message": "..."}}`.
"""

# multipart framing around the largest allowed file
_MULTIPART_OVERHEAD = 64 * 1024


class BodySizeLimit:
    """Rejects request bodies over the limit with 413 before they are parsed: by
    Content-Length when given, by counting the stream otherwise (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = envelope(413, "too_large", f"request body is larger than {self.limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await too_large(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


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

    app = FastAPI(
        title="advplugin", version=__version__, description=DESCRIPTION, lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(routes_system.router)
    app.include_router(routes_recognition.router)
    app.include_router(routes_subjects.router)
    # Template requests are JSON: up to max_templates_per_request rows of ~20 bytes per value.
    template_bytes = settings.max_templates_per_request * settings.template_dim * 24
    limit = max(settings.max_upload_bytes + _MULTIPART_OVERHEAD, template_bytes)
    app.add_middleware(BodySizeLimit, limit=limit)
    return app
