"""/health (no key needed), /status (what protects this gallery; never the key) and /audit
(the collection's audit trail; admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from advplugin.gallery.seal_state import SealInfo
from advplugin.service.deps import AdminCaller, CollectionName, State
from advplugin.service.schemas import (
    MAX_PAGE,
    AuditEventOut,
    AuditPage,
    ErrorResponse,
    ExtractorOut,
    HealthResponse,
    IndexOut,
    KeyOut,
    StatusResponse,
    StorageOut,
)

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthResponse)
def health() -> HealthResponse:
    return HealthResponse()


@router.get("/status", response_model=StatusResponse, responses={401: {"model": ErrorResponse}})
def status(state: State, collection: CollectionName) -> StatusResponse:
    p = state.protection
    e, index = p.expected, state.collections.index(collection)
    index.catch_up()
    view = state.collections.keys(collection)
    dim = p.extractor.dim if p.extractor is not None else e.input_dim
    template_count = state.gallery.count_templates(collection=collection)
    previous = view.previous.metadata.key_id if view.previous is not None else None
    if previous is None and not view.unknown:
        keys = [KeyOut(key_id=e.key_id, role="current", template_count=template_count)]
    else:  # a rotation is visible: count per key (one grouped scan; /status only)
        counts: dict[str | None, int] = {}
        for row in state.gallery.provenance(collection=collection):
            counts[row["key_id"]] = counts.get(row["key_id"], 0) + int(row["count"])  # type: ignore[arg-type, call-overload]
        keys = [
            KeyOut(key_id=k, role="current" if k == e.key_id else "previous" if k == previous else "unknown",
                   template_count=counts.get(k, 0))
            for k in [e.key_id, *([previous] if previous else []), *view.unknown]
        ]
    return StatusResponse(
        mode=state.settings.mode, scheme=e.scheme, scheme_version=e.scheme_version, key_id=e.key_id,
        template_dim=e.output_dim,
        extractor=ExtractorOut(name=p.extractor_name, version=p.extractor_version, dim=dim),
        collection=collection,
        subject_count=state.gallery.count_subjects(collection=collection),
        template_count=template_count,
        index=IndexOut(kind=index.config.kind, size=index.size, last_change=index.last_seq),
        previous_key_id=previous, keys=keys,
        storage=_storage(state.gallery.seal_info()),
    )


def _storage(info: SealInfo) -> StorageOut:
    return StorageOut(
        sealed=info.sealed, converting=info.converting, master_key_ids=info.master_key_ids,
        erasure_keys=info.erasure_store is not None,
    )


#: Pages beyond this are refused (422): page * size must fit the databases' 64-bit OFFSET.


@router.get("/audit", response_model=AuditPage, responses={s: {"model": ErrorResponse} for s in (401, 403, 422)})
def audit(
    state: State,
    caller: AdminCaller,
    page: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 0,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """The caller's collection's audit trail, oldest first: enrolments, deletions and API-key
    operations, by whom (API-key id or tool) and when. Needs an `admin` key."""
    g, c = state.gallery, caller.collection
    rows = g.audit_events(collection=c, offset=page * size, limit=size)
    return AuditPage(
        events=[
            AuditEventOut(id=r.id, created_at=r.created_at, actor=r.actor, api_key_id=r.api_key_id,
                          action=r.action, subject=r.subject, template_count=r.template_count)
            for r in rows
        ],
        page=page, size=size, total=g.count_audit_events(collection=c),
    )
