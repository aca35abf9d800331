"""/subjects: list (paginated), show, delete (from SQL and the index, in that order)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from advplugin.gallery import SubjectNotFound
from advplugin.gallery.audit import Actor
from advplugin.service.deps import CollectionName, EnrolCaller, State
from advplugin.service.errors import ServiceError
from advplugin.service.schemas import (
    FORBIDDEN,
    MAX_PAGE,
    DeleteSubjectResponse,
    ErrorResponse,
    SubjectName,
    SubjectOut,
    SubjectPage,
)

#: `{name:subject}` (`schemas._SubjectPathConvertor`): a subject named `a/b` (or `../x`), which /enroll accepts, is reached with
#: its `/` percent-encoded or not; with a plain `{name}` it could never be read or erased.
NamePath = Annotated[SubjectName, Path(description="the subject's name (`/` may be percent-encoded)")]

router = APIRouter(
    prefix="/subjects", tags=["subjects"],
    responses={s: {"model": ErrorResponse} for s in (401, 404, 422)},
)


@router.get("", response_model=SubjectPage)
def list_subjects(
    state: State,
    collection: CollectionName,
    page: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 0,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SubjectPage:
    rows = state.gallery.list_subjects(collection=collection, offset=page * size, limit=size)
    return SubjectPage(
        subjects=[SubjectOut(subject=r.name, template_count=r.template_count, created_at=r.created_at) for r in rows],
        page=page, size=size, total=state.gallery.count_subjects(collection=collection),
    )


@router.get("/{name:subject}", response_model=SubjectOut)
def get_subject(state: State, collection: CollectionName, name: NamePath) -> SubjectOut:
    try:
        r = state.gallery.get_subject(name, collection=collection)
    except SubjectNotFound as e:
        raise ServiceError(404, "unknown_subject", str(e)) from None
    return SubjectOut(subject=r.name, template_count=r.template_count, created_at=r.created_at)


@router.delete("/{name:subject}", response_model=DeleteSubjectResponse, responses=FORBIDDEN)
def delete_subject(state: State, caller: EnrolCaller, name: NamePath) -> DeleteSubjectResponse:
    """Delete the subject and every template of it (needs an `enrol` or `admin` key). SQL
    commits first (with the change-log rows and the audit event), then the index applies
    them; after a crash in between, the restart replays them."""
    try:
        n = state.collections.delete_subject(caller.collection, name, actor=Actor.api_key(caller.api_key_id))
    except SubjectNotFound as e:
        raise ServiceError(404, "unknown_subject", str(e)) from None
    return DeleteSubjectResponse(subject=name, deleted_templates=n)
