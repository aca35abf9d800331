"""/blind: enrol and identify with encrypted templates (ADVPLUGIN_MODE=blind, docs/blind.md).

Bodies are `advplugin.he.wire` messages (media type application/octet-stream): a JSON
header and raw CKKS ciphertexts, made and read by `advplugin.he.client.BlindClient`. The
identify response is such a message too: encrypted scores per block, which only the client's
secret key decrypts; the service never learns a score or which subject matched.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from advplugin.he.wire import MEDIA_TYPE
from advplugin.service.blind_service import BlindService
from advplugin.service.deps import CollectionName, EnrolCaller, State
from advplugin.service.errors import ServiceError
from advplugin.service.schemas import FORBIDDEN, ErrorResponse
from advplugin.service.state import ServiceState

router = APIRouter(
    prefix="/blind", tags=["blind"],
    responses={s: {"model": ErrorResponse} for s in (401, 409, 413, 422)},
)

#: The request body as OpenAPI documents it (read raw from the request, not parsed by FastAPI).
_BINARY_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {MEDIA_TYPE: {
    "schema": {"type": "string", "format": "binary",
               "description": "an advplugin.he.wire message: JSON header + CKKS ciphertexts"}}}}}
_BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
}


def _blind(state: ServiceState) -> BlindService:
    if state.blind is None:
        raise ServiceError(
            422, "blind_disabled", "this service does not run in blind mode (ADVPLUGIN_MODE=blind)"
        )
    return state.blind


async def _body(request: Request) -> bytes:
    # The app's BodySizeLimit already bounds the body for these paths (413 before reading).
    body = await request.body()
    if not body:
        raise ServiceError(422, "invalid_message", "empty body: send an advplugin.he.wire message")
    return body


@router.get("/params")
def params(state: State, collection: CollectionName) -> dict[str, Any]:
    """HE parameters, the collection's HE key id (once bound by the first enrolment), the
    next free slot, and the protection templates must carry before encryption."""
    return _blind(state).describe(collection)


@router.post("/enroll", status_code=201, openapi_extra=_BINARY_BODY, responses=FORBIDDEN)
async def enroll(
    request: Request, state: State, caller: EnrolCaller,
) -> dict[str, Any]:
    """Enrol encrypted templates at the block and offset of `GET /blind/params` (409
    `slot_conflict` when another enrolment took those slots first: re-read and retry).
    Needs an `enrol` or `admin` key."""
    blind = _blind(state)
    body = await _body(request)
    return await run_in_threadpool(blind.enroll, caller.collection, body)


@router.post("/identify", responses=_BINARY_RESPONSE, response_class=Response, openapi_extra=_BINARY_BODY)
async def identify(
    request: Request, state: State, collection: CollectionName,
) -> Response:
    """Encrypted scores of an encrypted probe against every block, with each block's live
    slots and subjects; the client decrypts, ranks and applies its threshold."""
    blind = _blind(state)
    body = await _body(request)
    out = await run_in_threadpool(blind.identify, collection, body)
    return Response(content=out, media_type=MEDIA_TYPE)
