"""/enroll, /identify, /verify: with images (the service extracts and protects) or with
templates protected on the client (the service never sees an image or a raw embedding)."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile

from advplugin.adapters import Detections
from advplugin.gallery import SubjectNotFound
from advplugin.gallery.audit import Actor
from advplugin.protectors.base import validate_embeddings
from advplugin.service.answers import Disclosed
from advplugin.service.deps import AnswersFor, EnrolCaller, State
from advplugin.service.errors import ServiceError
from advplugin.service.recognition import (
    current_key,
    face_box,
    key_view,
    protected_faces,
    read_upload,
)
from advplugin.service.schemas import (
    FORBIDDEN,
    Box,
    EnrolledItem,
    EnrolledTemplate,
    EnrollResponse,
    EnrollTemplatesRequest,
    EnrollTemplatesResponse,
    ErrorResponse,
    FaceResult,
    IdentifyResponse,
    IdentifyTemplatesRequest,
    SubjectName,
    SubjectSimilarity,
    TemplateProvenance,
    Threshold,
    VerifyResponse,
)
from advplugin.service.state import ServiceState, image_sha256

ERRORS = {s: {"model": ErrorResponse} for s in (401, 404, 413, 422, 503)}
#: Enrolment routes need an `enrol` or `admin` key (`advplugin.service.deps`).
#: Image routes may answer 429 (too many images in progress), and every route that answers a
#: match may answer 429 when the key's answer budget is used up (`budget_exceeded`), both
#: with Retry-After.
BUSY = {429: {"model": ErrorResponse, "headers": {"Retry-After": {
    "description": "seconds to wait before retrying", "schema": {"type": "integer"}}}}}
router = APIRouter(tags=["recognition"], responses=ERRORS)


# -- helpers ---------------------------------------------------------------------------------------
def _box(state: ServiceState, det: Detections, i: int) -> Box:
    """Face `i`'s box in the native answer's shape (CompreFace's routes shape their own)."""
    return Box(**face_box(state, det, i)._asdict())


def _client_templates(
    state: ServiceState, provenance: TemplateProvenance, rows: list[list[float]]
) -> np.ndarray:
    """Check that client templates were made by the gallery's scheme, key and extractor."""
    if state.blind is not None:  # a plaintext template would defeat the blind gallery
        raise ServiceError(422, "blind_mode", "this service runs in blind mode: use the /blind routes")
    e = state.protection.expected
    if (provenance.scheme, provenance.scheme_version) != (e.scheme, e.scheme_version):
        raise ServiceError(
            422, "wrong_scheme",
            f"templates must be protected with scheme {e.scheme} v{e.scheme_version}",
        )
    if provenance.key_id != e.key_id:
        raise ServiceError(422, "wrong_key", f"templates must be protected with key id {e.key_id}")
    if provenance.extractor_name != state.protection.extractor_name:
        raise ServiceError(
            422, "wrong_extractor", f"templates must come from extractor {state.protection.extractor_name}"
        )
    if len(rows) > state.settings.max_templates_per_request:
        raise ServiceError(
            413, "too_many_templates", f"at most {state.settings.max_templates_per_request} templates per request"
        )
    if any(len(r) != e.output_dim for r in rows):
        raise ServiceError(422, "wrong_dimension", f"templates must have dimension {e.output_dim}")
    try:
        # float64 first: a value past float32's range (1e39) is refused by its magnitude
        # (`validate_embeddings`), not cast to inf with a RuntimeWarning in the log.
        return validate_embeddings(np.asarray(rows, dtype=np.float64), e.output_dim, what="templates")
    except ValueError as err:
        raise ServiceError(422, "invalid_template", str(err)) from None


# -- images ----------------------------------------------------------------------------------------
@router.post("/enroll", response_model=EnrollResponse, status_code=201, responses=BUSY | FORBIDDEN)
def enroll(
    state: State,
    caller: EnrolCaller,
    file: Annotated[UploadFile, File(description="image: JPEG, PNG or WebP")],
    subject: Annotated[SubjectName, Form(description="the person's name in this collection")],
    faces: Annotated[
        Literal["largest", "all"], Form(description="enrol only the largest face, or every face")
    ] = "largest",
) -> EnrollResponse:
    """Enrol the face(s) of an image as protected templates of `subject` (created if new)."""
    collection = caller.collection
    name = subject
    data = read_upload(state, file)
    # Enrolments use the current key only (during a rotation: the new key).
    view = current_key(state)
    det, protected = protected_faces(
        state, data, view, largest_only=faces == "largest", max_faces=state.settings.max_faces
    )
    templates = protected[view.current]
    digest = image_sha256(data)
    ids = state.collections.enroll(
        collection, [name] * len(templates), templates, image_sha256=[digest] * len(templates),
        images=[data] * len(templates) if state.settings.store_images else None,
        actor=Actor.api_key(caller.api_key_id),
    )
    return EnrollResponse(
        subject=name,
        templates=[EnrolledTemplate(template_id=t, box=_box(state, det, i)) for i, t in enumerate(ids)],
    )


PREDICTION_COUNT = "subjects per face; keys without exact scores get at most the service's max_predictions (1)"
THRESHOLD = "only subjects at least this similar (keys without exact scores: compared with the band value)"


def _subjects(found: list[Disclosed]) -> list[SubjectSimilarity]:
    return [SubjectSimilarity(subject=d.subject, similarity=d.similarity) for d in found]


@router.post("/identify", response_model=IdentifyResponse, responses=BUSY)
def identify(
    state: State,
    answers: AnswersFor,
    file: Annotated[UploadFile, File(description="image: JPEG, PNG or WebP")],
    limit: Annotated[int, Query(ge=0, description="faces to recognise, largest first; 0: all")] = 0,
    prediction_count: Annotated[int, Query(ge=1, le=100, description=PREDICTION_COUNT)] = 1,
    threshold: Annotated[Threshold | None, Query(description=THRESHOLD)] = None,
) -> IdentifyResponse:
    """For every face (up to `limit`): its box and the subjects the answer policy lets this
    key be told (docs/service.md, "What an answer reveals")."""
    collection = answers.caller.collection
    data = read_upload(state, file)
    answers.admit()
    max_faces = min(limit or state.settings.max_faces, state.settings.max_faces)
    view = key_view(state, collection)
    det, probes = protected_faces(state, data, view, largest_only=False, max_faces=max_faces)
    found = answers.identify(view, collection, probes, prediction_count=prediction_count, threshold=threshold)
    return IdentifyResponse(
        result=[FaceResult(box=_box(state, det, i), subjects=_subjects(ds)) for i, ds in enumerate(found)]
    )


@router.post("/verify", response_model=VerifyResponse, responses=BUSY)
def verify(
    state: State,
    answers: AnswersFor,
    file: Annotated[UploadFile, File(description="image: JPEG, PNG or WebP")],
    subject: Annotated[SubjectName, Form(description="the subject to compare with")],
    threshold: Annotated[Threshold | None, Form(
        description="keys with exact scores: decide verified = similarity >= threshold (default: the operating "
        "point); ignored for other keys, which get the service's decision")] = None,
) -> VerifyResponse:
    """Whether the image's largest face is the subject (its best template): the decision,
    with the band of a match; the exact similarity only for keys granted exact scores."""
    collection = answers.caller.collection
    name = subject
    data = read_upload(state, file)
    try:
        state.gallery.get_subject(name, collection=collection)
    except SubjectNotFound as e:
        raise ServiceError(404, "unknown_subject", str(e)) from None
    answers.admit()
    view = key_view(state, collection)
    det, probes = protected_faces(state, data, view, largest_only=True, max_faces=1)
    m = state.collections.verify(view, collection, probes, name)
    verdict = answers.verify(collection, name, [m.similarity], threshold=threshold)[0]
    return VerifyResponse(subject=name, similarity=verdict.similarity, verified=verdict.verified,
                          box=_box(state, det, 0))


# -- protected templates (client-side protection) --------------------------------------------------
@router.post("/enroll/templates", response_model=EnrollTemplatesResponse, status_code=201, responses=FORBIDDEN)
def enroll_templates(
    state: State, caller: EnrolCaller, body: EnrollTemplatesRequest
) -> EnrollTemplatesResponse:
    """Enrol templates protected on the client with the gallery's scheme and key (the
    service needs no key for this and never sees an image or a raw embedding)."""
    names = [it.subject for it in body.items]
    templates = _client_templates(state, body.protection, [it.template for it in body.items])
    ids = state.collections.enroll(
        caller.collection, names, templates, extractor_version=body.protection.extractor_version,
        actor=Actor.api_key(caller.api_key_id),
    )
    return EnrollTemplatesResponse(
        templates=[EnrolledItem(subject=n, template_id=i) for n, i in zip(names, ids, strict=True)]
    )


@router.post("/identify/templates", response_model=IdentifyResponse, responses=BUSY)
def identify_templates(state: State, answers: AnswersFor, body: IdentifyTemplatesRequest) -> IdentifyResponse:
    """Identify client-protected probe templates: for each, the subjects the answer policy
    lets this key be told."""
    collection = answers.caller.collection
    templates = _client_templates(state, body.protection, body.templates)
    view = key_view(state, collection)
    probes = state.protection.convert_for(view, templates)
    found = answers.identify(view, collection, probes, prediction_count=body.prediction_count,
                             threshold=body.threshold)
    return IdentifyResponse(result=[FaceResult(subjects=_subjects(ds)) for ds in found])
