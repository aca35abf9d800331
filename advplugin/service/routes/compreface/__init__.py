"""CompreFace-compatible REST API (`/api/v1/...`): `router`, mounted beside the native routes
by `advplugin.service.app`; docs/compreface.md lists the routes and what differs and why."""

from advplugin.service.routes.compreface.routes import body_limit, router

__all__ = ["body_limit", "router"]
