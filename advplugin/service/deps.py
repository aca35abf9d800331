"""FastAPI dependencies (Annotated style): the running state and the caller's collection."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from advplugin.service.errors import ServiceError
from advplugin.service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def get_collection(
    state: State,
    x_api_key: Annotated[str | None, Header(description="API key of a collection")] = None,
) -> str:
    collection = state.auth.authenticate(x_api_key)
    if collection is None:
        # Same answer for a missing and a wrong key; the key is never echoed.
        raise ServiceError(401, "unauthorized", "missing or invalid x-api-key header")
    return collection


CollectionName = Annotated[str, Depends(get_collection)]
