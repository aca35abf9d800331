"""/health (no key needed) and /status (what protects this gallery; never the key)."""

from __future__ import annotations

from fastapi import APIRouter

from advplugin.service.deps import CollectionName, State
from advplugin.service.schemas import (
    ErrorResponse,
    ExtractorOut,
    HealthResponse,
    IndexOut,
    StatusResponse,
)

router = APIRouter(tags=["system"])


@router.get("/health", response_model=HealthResponse)
def health() -> HealthResponse:
    return HealthResponse()


@router.get("/status", response_model=StatusResponse, responses={401: {"model": ErrorResponse}})
def status(state: State, collection: CollectionName) -> StatusResponse:
    e, index = state.expected, state.index(collection)
    index.catch_up()
    dim = state.extractor.dim if state.extractor is not None else e.input_dim
    return StatusResponse(
        mode=state.settings.mode, scheme=e.scheme, scheme_version=e.scheme_version, key_id=e.key_id,
        template_dim=e.output_dim,
        extractor=ExtractorOut(name=state.extractor_name, version=state.extractor_version, dim=dim),
        collection=collection,
        subject_count=state.gallery.count_subjects(collection=collection),
        template_count=state.gallery.count_templates(collection=collection),
        index=IndexOut(kind=index.config.kind, size=index.size, last_change=index.last_seq),
    )
