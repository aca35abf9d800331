"""CompreFace's REST API (`/api/v1/...`) over the same service, gallery and API keys as the
native routes, so that CompreFace's SDKs work by changing the base URL (docs/compreface.md).

Every route here is a thin translation: images go through the same recognition steps as the
native routes (`advplugin.service.recognition`: upload bounds, extraction slot, protection
under the key view, boxes); writes, reads of examples and scores through `state.collections`
(index caught up before the answer; no SQL here). What CompreFace does and privacy forbids is
refused with a message saying why: no image download (images are not kept), no `calculator`
face plugin (a raw embedding never leaves the extracting process).

Errors keep CompreFace's shape, `{"message": ..., "code": <number>}` with CompreFace's
numbers (28: no face, 42: subject not found, ...), and carry the native envelope's `error`
object too; CompreFace answers validation problems with 400 where the native API says 422.
The app builds every error answer by path (`advplugin.service.errors.error_response`), so
this holds for every status, the 413s and 500s answered outside these routes included.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import StringConstraints
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.datastructures import UploadFile

from advplugin.adapters import Detections
from advplugin.gallery import SubjectNotFound
from advplugin.gallery.audit import Actor
from advplugin.gallery.reads import Example
from advplugin.service.answers import Verdict
from advplugin.service.deps import AnswersFor, CollectionName, EnrolCaller, State
from advplugin.service.errors import COMPREFACE_PREFIX, ServiceError
from advplugin.service.recognition import (
    check_upload,
    current_key,
    face_box,
    key_view,
    protected_faces,
    read_upload,
)
from advplugin.service.routes.compreface.schemas import (
    CfBox,
    CfDeleted,
    CfDetectedFace,
    CfDetectResponse,
    CfError,
    CfFace,
    CfFacePage,
    CfRecognizedFace,
    CfRecognizeResponse,
    CfSourceFace,
    CfSubject,
    CfSubjectBody,
    CfSubjectList,
    CfSubjectOut,
    CfUpdated,
    CfVerificationItem,
    CfVerificationResponse,
    CfVerifiedFace,
    CfVerifyResponse,
)
from advplugin.service.schemas import MAX_PAGE, SubjectName
from advplugin.service.state import KeyView, ServiceState, image_sha256

PREFIX = COMPREFACE_PREFIX
#: Paths that take images, and how many each takes (request body bounds, `body_limit`).
_IMAGE_PATHS = {
    PREFIX + "/recognition/faces": 1, PREFIX + "/recognition/recognize": 1,
    PREFIX + "/detection/detect": 1, PREFIX + "/verification/verify": 2,
}
_VERIFY_BY_ID = (PREFIX + "/recognition/faces/", "/verify")
#: Image ids: template ids (digits) or migrated CompreFace ids (UUIDs, 36 characters).
ID_MAX = 64
#: Ids per "delete many" request, and the largest such body (each id written as \uXXXX escapes).
MAX_IDS = 1000
_DELETE_MANY_BYTES = MAX_IDS * (ID_MAX * 6 + 4) + 1024

#: Face plugins CompreFace offers; `calculator` is refused for privacy, the others are not built.
_PLUGINS = {"calculator", "age", "gender", "landmarks", "mask", "pose"}


def body_limit(path: str, upload_bytes: int, multipart_overhead: int) -> int | None:
    """The largest legitimate body of a CompreFace route that takes more than the default
    (None: not one): each image as multipart or as base64 in JSON (4/3 of its bytes), plus
    framing; the ids of "delete many". Used by the app's
    `BodySizeLimit`, which otherwise bounds every body to a small size."""
    path = path.rstrip("/")
    if path == PREFIX + "/recognition/faces/delete":
        return _DELETE_MANY_BYTES
    images = _IMAGE_PATHS.get(path)
    if images is None and path.startswith(_VERIFY_BY_ID[0]) and path.endswith(_VERIFY_BY_ID[1]):
        images = 1
    if images is None:
        return None
    return images * (4 * math.ceil(upload_bytes / 3)) + multipart_overhead


#: Every status a CompreFace route may answer besides its success (CompreFace's 400 for what the
#: native routes answer 422; 429: too many images in progress, with Retry-After).
_ERRORS = {s: {"model": CfError} for s in (400, 401, 403, 404, 413, 429, 503)}
router = APIRouter(prefix=PREFIX, tags=["compreface"], responses=_ERRORS)


# -- request parts ----------------------------------------------------------------------------------
def _b64(state: ServiceState, value: object, field: str) -> bytes:
    """The image of a base64 field, bounded like a multipart upload: by its decoded bytes
    (`check_upload`; the string's length only spares decoding one far too long)."""
    limit = state.settings.max_upload_bytes
    if not isinstance(value, str) or not value:
        raise ServiceError(422, "invalid_request", f"{field}: a base64 string is required")
    if len(value) > 4 * math.ceil(limit / 3) + 4:
        raise ServiceError(413, "too_large", f"upload is larger than {limit} bytes")
    if value.startswith("data:") and "," in value:  # a data URL, as browsers make them
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(422, "invalid_image", f"{field} is not valid base64") from None
    return check_upload(state, data)


async def _images(request: Request, fields: tuple[str, ...]) -> list[bytes]:
    """The images of a request, by CompreFace's field names: multipart files, or base64
    strings in a JSON object (`Content-Type: application/json`)."""
    state: ServiceState = request.app.state.service
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(422, "invalid_request", "the JSON body could not be parsed") from None
        except RecursionError:  # e.g. 100,000 nested arrays: the parser's depth ran out
            raise ServiceError(422, "invalid_request", "the JSON body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ServiceError(422, "invalid_request", "the JSON body must be an object")
        return [_b64(state, body.get(f), f) for f in fields]
    # Parsed already, by the app's `single_form_values` (bounded parts, no repeated field).
    form = await request.form()
    if sum(isinstance(v, UploadFile) for _, v in form.multi_items()) > len(fields):
        raise ServiceError(422, "invalid_request", f"at most {len(fields)} file(s) per request")
    out = []
    for f in fields:
        upload = form.get(f)
        if not isinstance(upload, UploadFile):
            raise ServiceError(422, "invalid_request", f"{f}: a multipart file (or a JSON base64 string) is required")
        out.append(read_upload(state, upload))
    return out


async def one_image(request: Request) -> bytes:
    return (await _images(request, ("file",)))[0]


async def two_images(request: Request) -> list[bytes]:
    return await _images(request, ("source_image", "target_image"))


Image = Annotated[bytes, Depends(one_image)]
TwoImages = Annotated[list[bytes], Depends(two_images)]
DetProb = Annotated[float | None, Query(ge=0.0, le=1.0, description="minimum detector confidence of a face")]
Limit = Annotated[int, Query(ge=0, description="faces to process, largest first; 0: all")]
Status = Annotated[bool, Query(description="add execution_time and plugins_versions")]
Plugins = Annotated[str, Query(description="face plugins: none is offered (calculator is refused)")]


def _check_plugins(face_plugins: str) -> None:
    asked = [p.strip() for p in face_plugins.split(",") if p.strip()]
    if "calculator" in asked:
        raise ServiceError(
            422, "unsupported_plugin",
            "the calculator face plugin is refused: this service never returns a face embedding, "
            "the raw embedding never leaves the process that computes it (only protected templates "
            "are kept, and those are not returned either)",
        )
    if asked:
        known = [p for p in asked if p in _PLUGINS]
        raise ServiceError(
            422, "unsupported_plugin",
            f"face plugins {known or asked} are not available in advplugin; call without face_plugins",
        )


def _faces(
    state: ServiceState, data: bytes, view: KeyView, *, largest_only: bool, limit: int, det_prob: float | None
) -> tuple[Detections, dict[str | None, np.ndarray], np.ndarray]:
    """Detected faces (largest first, at most `limit`, 0: the service's maximum) with their
    protected templates, keeping only faces of confidence >= `det_prob`; 400/28 if none."""
    max_faces = min(limit or state.settings.max_faces, state.settings.max_faces)
    det, probes = protected_faces(state, data, view, largest_only=largest_only, max_faces=max_faces)
    keep = np.arange(len(det))
    if det_prob is not None:
        assert state.protection.extractor is not None
        conf = state.protection.extractor.confidence(det.scores)
        keep = np.flatnonzero(conf >= det_prob)
        if not len(keep):
            raise ServiceError(422, "no_face", "no face is found in the given image above det_prob_threshold")
    return det, probes, keep


def _cf_box(state: ServiceState, det: Detections, i: int) -> CfBox:
    """Face `i`'s box in CompreFace's shape (no detector score: CompreFace has none)."""
    b = face_box(state, det, i)
    return CfBox(probability=b.probability, x_max=b.x_max, y_max=b.y_max, x_min=b.x_min, y_min=b.y_min)


def _versions(state: ServiceState, status: bool) -> dict[str, str] | None:
    if not status:
        return None
    e = state.protection.expected
    return {"detector": state.protection.extractor_name,
            "calculator": f"{state.protection.extractor_name} (protected: {e.scheme} v{e.scheme_version})"}


def _elapsed(start: float, status: bool) -> dict[str, float] | None:
    return {"total": round((time.perf_counter() - start) * 1000, 1)} if status else None


def _no_subject(name: str) -> ServiceError:
    return ServiceError(404, "unknown_subject", f"subject {name!r} not found")


# -- image ids --------------------------------------------------------------------------------------
def _example(state: ServiceState, collection: str, image_id: str) -> Example:
    """The example an image id names in this collection (`CollectionService.example`: a
    template id, or the id a migrated row had); 404/11 otherwise."""
    found = state.collections.example(collection, image_id)
    if found is None:
        raise ServiceError(404, "image_not_found", "no face example with this image_id")
    return found


# -- recognition service: examples (faces) ----------------------------------------------------------
@router.post("/recognition/faces", response_model=CfFace, status_code=201)
def add_example(
    state: State, caller: EnrolCaller, image: Image,
    subject: Annotated[SubjectName, Query(description="the person's name")],
    det_prob_threshold: DetProb = None,
) -> CfFace:
    """Add an example of `subject` (created if new): its largest face becomes a protected
    template; the image itself is not kept. image_id is the template id."""
    name = subject
    view = current_key(state)
    _, probes, keep = _faces(state, image, view, largest_only=True, limit=1, det_prob=det_prob_threshold)
    templates = probes[view.current][keep[:1]]
    ids = state.collections.enroll(
        caller.collection, [name], templates, image_sha256=[image_sha256(image)],
        actor=Actor.api_key(caller.api_key_id),
    )
    return CfFace(image_id=str(ids[0]), subject=name)


@router.get("/recognition/faces", response_model=CfFacePage)
def list_examples(
    state: State, collection: CollectionName,
    page: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 0,
    size: Annotated[int, Query(ge=1, le=1000)] = 20,
    subject: Annotated[SubjectName | None, Query(description="only this subject's examples")] = None,
) -> CfFacePage:
    """Examples (templates) of the collection, by image id; never their vectors."""
    found = state.collections.examples(collection, subject, offset=page * size, limit=size)
    return CfFacePage(
        faces=[CfFace(image_id=str(e.template_id), subject=e.subject) for e in found.examples],
        page_number=page, page_size=size, total_pages=math.ceil(found.total / size), total_elements=found.total,
    )


@router.delete("/recognition/faces", response_model=CfDeleted)
def delete_examples(
    state: State, caller: EnrolCaller,
    subject: Annotated[SubjectName | None, Query(description="whose examples; absent: every example")] = None,
) -> CfDeleted:
    """Delete every example of `subject` (the subject stays, as in CompreFace), or, without
    `subject`, every example of the collection."""
    deleted = state.collections.delete_examples(caller.collection, subject, actor=Actor.api_key(caller.api_key_id))
    return CfDeleted(deleted=deleted)


class _ImageIdConvertor(StringConvertor):
    """An image id in a path: any segment but `delete`, so `/faces/delete` (CompreFace's
    "delete many", POST) is not also `DELETE /faces/{image_id}` (405s name POST only)."""

    regex = "(?!delete$)[^/]+"


register_url_convertor("cf_image_id", _ImageIdConvertor())


@router.delete("/recognition/faces/{image_id:cf_image_id}", response_model=CfFace)
def delete_example(
    state: State, caller: EnrolCaller, image_id: Annotated[str, Path(max_length=ID_MAX)]
) -> CfFace:
    tid, name = _example(state, caller.collection, image_id)
    state.collections.delete_templates(caller.collection, {tid: name}, actor=Actor.api_key(caller.api_key_id))
    return CfFace(image_id=image_id, subject=name)


@router.post("/recognition/faces/delete", response_model=list[CfFace])
def delete_many_examples(
    state: State, caller: EnrolCaller,
    image_ids: Annotated[list[Annotated[str, StringConstraints(max_length=ID_MAX)]], Body(max_length=MAX_IDS)],
) -> list[CfFace]:
    """Delete several examples by image id; unknown ids are skipped (CompreFace's
    "delete multiple examples"). Answers the examples deleted."""
    found: dict[int, str] = {}
    out = []
    for image_id in image_ids:
        example = state.collections.example(caller.collection, image_id)
        if example is None:
            continue
        found[example.template_id] = example.subject
        out.append(CfFace(image_id=image_id, subject=example.subject))
    if found:
        state.collections.delete_templates(caller.collection, found, actor=Actor.api_key(caller.api_key_id))
    return out


@router.get("/recognition/faces/{image_id}/img", include_in_schema=False)
def download_image(image_id: str) -> None:
    raise ServiceError(
        404, "image_not_found",
        "image download is not offered: advplugin does not keep enrolled images, only protected templates",
    )


def _cf_similarity(verdict: Verdict) -> float:
    """CompreFace's `similarity` of a verdict: the exact score or the band of a match, 0.0 for
    a face below the operating point (a CompreFace client's threshold then rejects it)."""
    return verdict.similarity if verdict.similarity is not None else 0.0


@router.post("/recognition/faces/{image_id}/verify", response_model=CfVerifyResponse)
def verify_example(
    state: State, answers: AnswersFor, image: Image,
    image_id: Annotated[str, Path(max_length=ID_MAX)],
    limit: Limit = 0, det_prob_threshold: DetProb = None, status: Status = False, face_plugins: Plugins = "",
) -> CfVerifyResponse:
    """Whether every face of the image (up to `limit`) is the person of one stored example:
    the decision as a band value (0.0: not verified); the exact similarity only for keys
    granted exact scores. Counted against the key's budget like identification."""
    start = time.perf_counter()
    collection = answers.caller.collection
    _check_plugins(face_plugins)
    tid, subject = _example(state, collection, image_id)
    answers.admit()
    view = key_view(state, collection)
    det, probes, keep = _faces(state, image, view, largest_only=False, limit=limit, det_prob=det_prob_threshold)
    sims = state.collections.score_template(view, {k: v[keep] for k, v in probes.items()}, tid)
    if sims is None:  # deleted meanwhile
        raise ServiceError(404, "image_not_found", "no face example with this image_id")
    verdicts = answers.verify(collection, subject, sims)
    elapsed = _elapsed(start, status)
    return CfVerifyResponse(
        result=[CfVerifiedFace(box=_cf_box(state, det, int(i)), similarity=_cf_similarity(v), execution_time=elapsed)
                for i, v in zip(keep, verdicts, strict=True)],
        plugins_versions=_versions(state, status),
    )


@router.post("/recognition/recognize", response_model=CfRecognizeResponse)
def recognize(
    state: State, answers: AnswersFor, image: Image,
    limit: Limit = 0,
    prediction_count: Annotated[int, Query(
        ge=1, le=100, description="subjects per face; keys without exact scores get at most max_predictions (1)")] = 1,
    det_prob_threshold: DetProb = None, status: Status = False, face_plugins: Plugins = "",
) -> CfRecognizeResponse:
    """For every face (up to `limit`, largest first): its box and the subjects the answer
    policy lets this key be told, as the native /identify answers them (matches only, with
    band values, unless the key was granted exact scores)."""
    start = time.perf_counter()
    collection = answers.caller.collection
    _check_plugins(face_plugins)
    answers.admit()
    view = key_view(state, collection)
    det, probes, keep = _faces(state, image, view, largest_only=False, limit=limit, det_prob=det_prob_threshold)
    kept = {k: v[keep] for k, v in probes.items()}
    found = answers.identify(view, collection, kept, prediction_count=prediction_count, threshold=None)
    elapsed = _elapsed(start, status)
    return CfRecognizeResponse(
        result=[
            CfRecognizedFace(
                box=_cf_box(state, det, int(i)),
                subjects=[CfSubject(subject=d.subject, similarity=d.similarity) for d in ds],
                execution_time=elapsed,
            )
            for i, ds in zip(keep, found, strict=True)
        ],
        plugins_versions=_versions(state, status),
    )


# -- recognition service: subjects ------------------------------------------------------------------
@router.get("/recognition/subjects", response_model=CfSubjectList)
def list_subjects(state: State, collection: CollectionName) -> CfSubjectList:
    return CfSubjectList(subjects=state.collections.subject_names(collection))


@router.post("/recognition/subjects", response_model=CfSubjectOut, status_code=201)
def add_subject(state: State, caller: EnrolCaller, body: CfSubjectBody) -> CfSubjectOut:
    """A subject without examples yet; 400/43 when it exists."""
    name = body.subject
    if not state.collections.add_subject(caller.collection, name, actor=Actor.api_key(caller.api_key_id)):
        raise ServiceError(422, "subject_exists", f"subject {name!r} already exists")
    return CfSubjectOut(subject=name)


@router.put("/recognition/subjects/{subject:subject}", response_model=CfUpdated)
def rename_subject(
    state: State, caller: EnrolCaller, subject: Annotated[SubjectName, Path()], body: CfSubjectBody
) -> CfUpdated:
    """Rename (merging into the new name when it exists, as CompreFace does; the same name:
    `updated` false): the subject's protected templates are re-enrolled under the new name
    and the old subject is deleted (crypto-shredded), in ONE serialised write transaction
    (`CollectionService.rename_subject`), so a delete, enrolment or other rename of it never
    interleaves. No raw embedding is involved; the examples get new image ids. 503 while a
    key rotation has templates of it under the previous key."""
    old, new = subject, body.subject
    try:
        renamed = state.collections.rename_subject(
            caller.collection, old, new, actor=Actor.api_key(caller.api_key_id)
        )
    except SubjectNotFound:
        raise _no_subject(old) from None
    return CfUpdated(updated=renamed)


@router.delete("/recognition/subjects/{subject:subject}", response_model=CfSubjectOut)
def delete_subject(state: State, caller: EnrolCaller, subject: Annotated[SubjectName, Path()]) -> CfSubjectOut:
    name = subject
    try:
        state.collections.delete_subject(caller.collection, name, actor=Actor.api_key(caller.api_key_id))
    except SubjectNotFound:
        raise _no_subject(name) from None
    return CfSubjectOut(subject=name)


@router.delete("/recognition/subjects", response_model=CfDeleted)
def delete_all_subjects(state: State, caller: EnrolCaller) -> CfDeleted:
    deleted = state.collections.delete_all_subjects(caller.collection, actor=Actor.api_key(caller.api_key_id))
    return CfDeleted(deleted=deleted)


# -- detection and verification services ------------------------------------------------------------
@router.post("/detection/detect", response_model=CfDetectResponse)
def detect(
    state: State, collection: CollectionName, image: Image,
    limit: Limit = 0, det_prob_threshold: DetProb = None, status: Status = False, face_plugins: Plugins = "",
) -> CfDetectResponse:
    """Boxes of the faces (the same pipeline as recognition; nothing is stored)."""
    start = time.perf_counter()
    _check_plugins(face_plugins)
    view = current_key(state)
    det, _, keep = _faces(state, image, view, largest_only=False, limit=limit, det_prob=det_prob_threshold)
    elapsed = _elapsed(start, status)
    return CfDetectResponse(
        result=[CfDetectedFace(box=_cf_box(state, det, int(i)), execution_time=elapsed) for i in keep],
        plugins_versions=_versions(state, status),
    )


@router.post("/verification/verify", response_model=CfVerificationResponse)
def verify_images(
    state: State, answers: AnswersFor, images: TwoImages,
    limit: Limit = 0, det_prob_threshold: DetProb = None, status: Status = False, face_plugins: Plugins = "",
) -> CfVerificationResponse:
    """The largest face of `source_image` against every face of `target_image` (up to
    `limit`): both protected under the current key and compared with the scheme's scorer,
    the one identification uses. Nothing is stored, and no stored template is touched, so no
    budget is counted; the similarity is the band of a match (0.0: not the same person) unless
    the key was granted exact scores."""
    start = time.perf_counter()
    _check_plugins(face_plugins)
    view = current_key(state)
    src_det, src, src_keep = _faces(state, images[0], view, largest_only=True, limit=1, det_prob=det_prob_threshold)
    tgt_det, tgt, tgt_keep = _faces(
        state, images[1], view, largest_only=False, limit=limit, det_prob=det_prob_threshold
    )
    sims = state.collections.compare(view, tgt[view.current][tgt_keep], src[view.current][src_keep[:1]])
    verdicts = answers.compare(answers.caller.collection, sims)
    elapsed = _elapsed(start, status)
    return CfVerificationResponse(result=[CfVerificationItem(
        source_image_face=CfSourceFace(box=_cf_box(state, src_det, int(src_keep[0]))),
        face_matches=[CfVerifiedFace(box=_cf_box(state, tgt_det, int(i)), similarity=_cf_similarity(v),
                                     execution_time=elapsed)
                      for i, v in zip(tgt_keep, verdicts, strict=True)],
        plugins_versions=_versions(state, status),
    )])
