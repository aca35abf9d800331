"""FastAPI dependencies (Annotated style): the running state, the caller's collection and
what its key's scope allows.

Scopes (`advplugin.gallery.apikeys.SCOPES`): every key may read and match (`CollectionName`,
`IdentifyCaller`); enrolling and deleting need an `enrol` or `admin` key (`EnrolCaller`); the
audit trail needs `admin` (`AdminCaller`). FastAPI resolves `get_caller` once per request,
however many of these a route uses."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from advplugin.gallery.apikeys import scope_allows
from advplugin.service.answers import Answers
from advplugin.service.auth import Caller, Stale
from advplugin.service.errors import ServiceError
from advplugin.service.state import ServiceState


# The dependencies are `async def` although they never await anything slow: FastAPI runs a
# plain `def` dependency in its thread pool, one hop per dependency per request (~0.2-0.5 ms
# each on a busy 2-core machine: a third of an image request's overhead over bare
# extraction, benchmarks/http_load.py). Only a re-read of the API-key store goes to a thread.
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


async def get_caller(
    state: State,
    x_api_key: Annotated[str | None, Header(description="API key of a collection")] = None,
) -> Caller:
    caller = state.auth.cached_caller(x_api_key)
    if isinstance(caller, Stale):  # SQL: not on the event loop
        caller = await run_in_threadpool(state.auth.caller, x_api_key)
    if caller is None:
        # Same answer for a missing and a wrong key; the key is never echoed.
        raise ServiceError(401, "unauthorized", "missing or invalid x-api-key header")
    return caller


IdentifyCaller = Annotated[Caller, Depends(get_caller)]


async def get_collection(caller: IdentifyCaller) -> str:
    return caller.collection


CollectionName = Annotated[str, Depends(get_collection)]


def _require(needed: str) -> Callable[[Caller], Coroutine[Any, Any, Caller]]:
    async def check(caller: IdentifyCaller) -> Caller:
        if not scope_allows(caller.scope, needed):
            # Names the scope needed, never the key (nor its id: the caller knows its key).
            raise ServiceError(403, "forbidden", f"this API key's scope does not allow this: needs scope {needed!r}")
        return caller

    return check


async def get_answers(state: State, caller: IdentifyCaller) -> Answers:
    """The answer policy bound to the caller: every route that answers a similarity or a
    match decision takes this and gets its matches through it (`advplugin.service.answers`)."""
    return state.answers.bind(caller)


AnswersFor = Annotated[Answers, Depends(get_answers)]
EnrolCaller = Annotated[Caller, Depends(_require("enrol"))]
AdminCaller = Annotated[Caller, Depends(_require("admin"))]
