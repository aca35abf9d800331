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


#: Form content types (`request.form()` parses both); every route with form fields takes a
#: file, so only multipart reaches a route, but a urlencoded body is checked the same way.
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: Parts of one form, at most: no route reads more than two files (CompreFace's
#: verification) nor more than three fields (/verify: file, subject, threshold).
MAX_FORM_FILES, MAX_FORM_FIELDS = 2, 8


async def single_form_values(request: Request) -> None:
    """Refuses a form that gives one field twice (two `file` parts, two `subject` fields):
    the routes read one value per field, and Starlette's form keeps the LAST of repeated
    ones, so a second `file` or `subject` was used silently (422 `invalid_request`; on
    CompreFace's routes its 400 with code 26, by the app's error shapes).

    One app-level dependency for every route of both APIs, not a check per route: FastAPI
    parses a route's declared form (the native routes') before any dependency runs, and
    this reads that same parsed form; CompreFace's routes read their files with
    `request.form()` in a dependency of their own, which runs after this one and gets the
    form parsed here (the request caches it), with this service-wide bound on its parts."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in _FORM_TYPES:
        return
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    names = [name for name, _ in form.multi_items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        # Named only when it looks like a field name (a client chose it: never echo content).
        shown = repr(repeated[0]) if repeated[0].isidentifier() and len(repeated[0]) <= 32 else "a field"
        raise ServiceError(
            422, "invalid_request", f"form field {shown} is given {names.count(repeated[0])} times: send each once"
        )


async def get_answers(state: State, caller: IdentifyCaller) -> Answers:
    """The answer policy bound to the caller: every route that answers a similarity or a
    match decision takes this and gets its matches through it (`advplugin.service.answers`)."""
    return state.answers.bind(caller)


AnswersFor = Annotated[Answers, Depends(get_answers)]
EnrolCaller = Annotated[Caller, Depends(_require("enrol"))]
AdminCaller = Annotated[Caller, Depends(_require("admin"))]
