"""Request and response schemas. Responses never carry vectors: only ids, names, boxes and
similarities. Template requests carry protected templates and the metadata that proves
they were made by the same scheme and key as the gallery."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StringConstraints
from starlette.convertors import PathConvertor, register_url_convertor

from advplugin.gallery.names import (
    EXTRACTOR_NAME_MAX,
    EXTRACTOR_VERSION_MAX,
    SUBJECT_NAME_MAX,
    canonical_name,
    check_text,
)

#: No NUL character: PostgreSQL cannot store one. In the OpenAPI schema so clients (and
#: fuzzers) see the rule; `check_text` enforces it with the length on both databases.
NO_NUL = r"^[^\x00]*$"


def _stored_text(max_length: int, what: str) -> tuple[StringConstraints, AfterValidator]:
    """Constraints of a string the gallery stores: bounded by its column's length (checked
    by pydantic while validating, before anything reaches the gallery, which checks again)."""
    return (
        StringConstraints(min_length=1, max_length=max_length, pattern=NO_NUL),
        AfterValidator(lambda v: check_text(v, what, max_length)),
    )


#: A subject's name: 1 to 255 characters, not blank, no control characters, in its one
#: canonical form (NFC, trimmed: `canonical_name`), in a form field, JSON or a path alike;
#: so "é" as one or two code points, and " Ann " and "Ann", name one subject on every route.
SubjectName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=SUBJECT_NAME_MAX, pattern=NO_NUL),
    AfterValidator(lambda v: canonical_name(v, "subject")),
]
class _SubjectPathConvertor(PathConvertor):
    """`{name:subject}` in a route's path: as `path` (a subject named `a/b` is reached with
    its `/` plain or percent-encoded), and matching every character, newline included, so a
    name holding one reaches `SubjectName`'s check (422) instead of matching no route (404)."""

    regex = "(?s:.*)"


register_url_convertor("subject", _SubjectPathConvertor())

#: Short identifiers compared with the served ones (never stored): bounded all the same.
ShortText = Annotated[str, StringConstraints(max_length=128, pattern=NO_NUL)]
#: A template value: a JSON number (not a string such as "0.1", not a boolean), finite.
TemplateValue = Annotated[StrictFloat, Field(allow_inf_nan=False)]
#: An optional similarity threshold: a finite number.
Threshold = Annotated[float, Field(allow_inf_nan=False)]


def _assume_utc(value: datetime) -> datetime:
    """Stored times are UTC (`models.utcnow`); SQLite returns them without a zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_assume_utc)]


class ErrorBody(BaseModel):
    code: str = Field(examples=["no_face"])
    message: str = Field(examples=["no face found in the image"])


class ErrorResponse(BaseModel):
    error: ErrorBody


#: OpenAPI entry of a route a key's scope may be refused (403 `forbidden`).
FORBIDDEN = {403: {"model": ErrorResponse}}
#: Pages beyond this are refused (422): page * size must fit the databases' 64-bit OFFSET.
MAX_PAGE = 2**31 - 1


class Box(BaseModel):
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    probability: float = Field(
        ge=0.0, le=1.0,
        description="detector confidence in [0, 1] (0 where the detector gives none); for dlib's "
        "HOG detector the logistic of its SVM margin, 1 / (1 + exp(-score)), so >= 0.5",
    )
    score: float | None = Field(
        None, description="the detector's own score (for dlib, the SVM margin: unbounded)"
    )


class EnrolledTemplate(BaseModel):
    template_id: int
    box: Box | None = None


class EnrollResponse(BaseModel):
    subject: str
    templates: list[EnrolledTemplate]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"subject": "Ada", "templates": [{"template_id": 17, "box": {
                "x_min": 68, "y_min": 80, "x_max": 175, "y_max": 187, "probability": 0.77,
                "score": 1.2}}]}]
        }
    )


class SubjectSimilarity(BaseModel):
    subject: str
    similarity: float = Field(description=(
        "keys with exact scores: the scheme's similarity; other keys: the band of the match (0.85: "
        "FMR 1e-2, 0.90: 1e-3, 0.95: 1e-4, 0.99: 1e-5; docs/service.md, 'What an answer reveals')"))


class FaceResult(BaseModel):
    box: Box | None = None
    subjects: list[SubjectSimilarity]


class IdentifyResponse(BaseModel):
    result: list[FaceResult]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"result": [{"box": {"x_min": 68, "y_min": 80, "x_max": 175, "y_max": 187,
                                              "probability": 0.77, "score": 1.2},
                                      "subjects": [{"subject": "Ada", "similarity": 0.93}]}]}]
        }
    )


class VerifyResponse(BaseModel):
    subject: str
    similarity: float | None = Field(description=(
        "keys with exact scores: the similarity; other keys: the band of a match, null when not verified"))
    verified: bool = Field(description="the decision: at the collection's operating point (exact-scores keys: "
                           "similarity >= their threshold when given)")
    box: Box | None = None


class SubjectOut(BaseModel):
    subject: str
    template_count: int
    created_at: UtcDatetime


class SubjectPage(BaseModel):
    subjects: list[SubjectOut]
    page: int
    size: int
    total: int


class AuditEventOut(BaseModel):
    """One audit event: who (an API key by its id, or a tool such as `cli`), what, when;
    never a vector, an image or a key."""

    id: int
    created_at: UtcDatetime
    actor: str = Field(examples=["api-key"])
    api_key_id: int | None
    action: str = Field(examples=["enroll"])
    subject: str | None
    template_count: int | None


class AuditPage(BaseModel):
    events: list[AuditEventOut]
    page: int
    size: int
    total: int


class DeleteSubjectResponse(BaseModel):
    subject: str
    deleted_templates: int


class HealthResponse(BaseModel):
    status: str = "ok"


class ExtractorOut(BaseModel):
    name: str
    version: str
    dim: int


class IndexOut(BaseModel):
    kind: str
    size: int
    last_change: int


class KeyOut(BaseModel):
    """Templates of the collection under one key (its id only, never the key)."""

    key_id: str | None
    role: Literal["current", "previous", "unknown"] = Field(
        description="current: enrolments use it; previous: being retired by a key rotation; "
        "unknown: this service holds no key for it (identification answers 503)"
    )
    template_count: int


class StorageOut(BaseModel):
    """Sealed storage (docs/sealed-storage.md): whether a copy of the database or of the
    index snapshots reveals templates, and whether deleting a subject shreds it in copies."""

    sealed: bool = Field(description="template vectors and snapshots are AES-256-GCM ciphertext")
    converting: bool = Field(description="`advplugin db seal` has not finished: plaintext rows may remain")
    master_key_ids: list[str] = Field(description="the master key(s) the data key is wrapped by (ids only)")
    erasure_keys: bool = Field(
        description="subjects get erasure keys outside the database: a delete makes them unreadable in every copy"
    )


class StatusResponse(BaseModel):
    """What the service protects with; keys appear only as key ids."""

    mode: str
    scheme: str
    scheme_version: int
    key_id: str | None
    template_dim: int
    extractor: ExtractorOut
    collection: str
    subject_count: int
    template_count: int
    index: IndexOut
    previous_key_id: str | None = Field(
        None, description="while a key rotation is in progress: the key id being retired"
    )
    keys: list[KeyOut] = Field(description="how many templates of this collection are under each key id")
    storage: StorageOut


# -- protected-template mode (client-side protection) --------------------------------------------
class TemplateProvenance(BaseModel):
    """What made client templates (the `protection` field of a template request): the
    protector's scheme, version and key id and the extractor; must match the gallery's. Not
    the service core's `advplugin.service.protection.Protection`, which protects."""

    scheme: ShortText = Field(examples=["xnn"])
    scheme_version: int = Field(examples=[1])
    key_id: ShortText | None = Field(examples=["3f9a0c1d2e4b5a69"])
    extractor_name: Annotated[str, *_stored_text(EXTRACTOR_NAME_MAX, "extractor_name")] = Field(
        "dlib", examples=["dlib"]
    )
    # Stored on every template row: bounded like its column (a 100 kB version copied into
    # 1,000 rows once grew a gallery by 200 MB).
    extractor_version: Annotated[str, *_stored_text(EXTRACTOR_VERSION_MAX, "extractor_version")] = Field(
        "unknown", examples=["dlib_face_recognition_resnet_model_v1"]
    )


class TemplateItem(BaseModel):
    subject: SubjectName
    template: list[TemplateValue]


class EnrollTemplatesRequest(BaseModel):
    protection: TemplateProvenance
    items: list[TemplateItem] = Field(min_length=1)


class EnrolledItem(BaseModel):
    subject: str
    template_id: int


class EnrollTemplatesResponse(BaseModel):
    templates: list[EnrolledItem]


class IdentifyTemplatesRequest(BaseModel):
    protection: TemplateProvenance
    templates: list[list[TemplateValue]] = Field(min_length=1)
    prediction_count: int = Field(
        1, ge=1, le=100, description="keys without exact scores get at most the service's max_predictions (1)")
    threshold: Threshold | None = None
