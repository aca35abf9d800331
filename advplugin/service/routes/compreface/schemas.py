"""CompreFace's response shapes (docs/compreface.md), field for field where they exist.

Never an `embedding` field: CompreFace returns raw embeddings when asked (its `calculator`
face plugin); this service refuses that plugin, so no response model has room for a vector.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from advplugin.service.schemas import SubjectName


class CfError(BaseModel):
    """CompreFace's error body, with the native envelope's `error` object beside it."""

    message: str | None = None
    code: int | None = Field(None, description="CompreFace's error number (28: no face, 42: subject not found, ...)")
    error: dict[str, str] = Field(description="the native envelope: its `code` and `message`")


class CfBox(BaseModel):
    probability: float = Field(description="detector confidence in [0, 1] (for dlib: the logistic of its margin)")
    x_max: int
    y_max: int
    x_min: int
    y_min: int


class CfSubject(BaseModel):
    subject: str
    similarity: float


class CfRecognizedFace(BaseModel):
    box: CfBox
    subjects: list[CfSubject]
    execution_time: dict[str, float] | None = None


class CfRecognizeResponse(BaseModel):
    result: list[CfRecognizedFace]
    plugins_versions: dict[str, str] | None = None


class CfDetectedFace(BaseModel):
    box: CfBox
    execution_time: dict[str, float] | None = None


class CfDetectResponse(BaseModel):
    result: list[CfDetectedFace]
    plugins_versions: dict[str, str] | None = None


class CfVerifiedFace(BaseModel):
    box: CfBox
    similarity: float
    execution_time: dict[str, float] | None = None


class CfVerifyResponse(BaseModel):
    result: list[CfVerifiedFace]
    plugins_versions: dict[str, str] | None = None


class CfSourceFace(BaseModel):
    box: CfBox


class CfVerificationItem(BaseModel):
    source_image_face: CfSourceFace
    face_matches: list[CfVerifiedFace]
    plugins_versions: dict[str, str] | None = None


class CfVerificationResponse(BaseModel):
    result: list[CfVerificationItem]


class CfFace(BaseModel):
    image_id: str = Field(description="the template id (a migrated CompreFace image id also finds it)")
    subject: str


class CfFacePage(BaseModel):
    faces: list[CfFace]
    page_number: int
    page_size: int
    total_pages: int
    total_elements: int


class CfDeleted(BaseModel):
    deleted: int


class CfSubjectBody(BaseModel):
    subject: SubjectName


class CfSubjectOut(BaseModel):
    subject: str


class CfUpdated(BaseModel):
    updated: bool


class CfSubjectList(BaseModel):
    subjects: list[str]
