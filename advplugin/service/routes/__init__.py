"""The HTTP edge of the service: FastAPI routers that parse a request, call the service core
(`state.collections`, `state.answers`, `advplugin.service.recognition`, `state.blind`) and
shape its answer; nothing else.

`recognition`, `subjects`, `system`: the native API; `blind`: blind mode's encrypted routes
(docs/blind.md); `compreface`: CompreFace's `/api/v1` (docs/compreface.md). No module here
imports SQLAlchemy (an import-linter contract in `.importlinter`): a query a route needs is a
method of the core, backed by the gallery, so both API families read the same way.
"""
