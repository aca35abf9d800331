"""Request and response schemas. Responses never carry vectors: only ids, names, boxes and
similarities. Template requests carry protected templates and the metadata that proves
they were made by the same scheme and key as the gallery."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["no_face"])
    message: str = Field(examples=["no face found in the image"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class Box(BaseModel):
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    probability: float = Field(description="detector confidence (0 where the detector gives none)")


class EnrolledTemplate(BaseModel):
    template_id: int
    box: Box | None = None


class EnrollResponse(BaseModel):
    subject: str
    templates: list[EnrolledTemplate]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"subject": "Ada", "templates": [{"template_id": 17, "box": {
                "x_min": 68, "y_min": 80, "x_max": 175, "y_max": 187, "probability": 1.2}}]}]
        }
    )


class SubjectSimilarity(BaseModel):
    subject: str
    similarity: float


class FaceResult(BaseModel):
    box: Box | None = None
    subjects: list[SubjectSimilarity]


class IdentifyResponse(BaseModel):
    result: list[FaceResult]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"result": [{"box": {"x_min": 68, "y_min": 80, "x_max": 175, "y_max": 187,
                                              "probability": 1.2},
                                      "subjects": [{"subject": "Ada", "similarity": 0.93}]}]}]
        }
    )


class VerifyResponse(BaseModel):
    subject: str
    similarity: float
    verified: bool | None = Field(None, description="similarity >= threshold, when one was given")
    box: Box | None = None


class SubjectOut(BaseModel):
    subject: str
    template_count: int
    created_at: datetime


class SubjectPage(BaseModel):
    subjects: list[SubjectOut]
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


# -- protected-template mode (client-side protection) --------------------------------------------
class Protection(BaseModel):
    """Metadata of the protector that made the templates; must match the gallery's."""

    scheme: str = Field(examples=["xnn"])
    scheme_version: int = Field(examples=[1])
    key_id: str | None = Field(examples=["3f9a0c1d2e4b5a69"])
    extractor_name: str = Field("dlib", examples=["dlib"])
    extractor_version: str = Field("unknown", examples=["dlib_face_recognition_resnet_model_v1"])


class TemplateItem(BaseModel):
    subject: str = Field(min_length=1, max_length=255)
    template: list[float]


class EnrollTemplatesRequest(BaseModel):
    protection: Protection
    items: list[TemplateItem] = Field(min_length=1)


class EnrolledItem(BaseModel):
    subject: str
    template_id: int


class EnrollTemplatesResponse(BaseModel):
    templates: list[EnrolledItem]


class IdentifyTemplatesRequest(BaseModel):
    protection: Protection
    templates: list[list[float]] = Field(min_length=1)
    prediction_count: int = Field(1, ge=1, le=100)
    threshold: float | None = None
