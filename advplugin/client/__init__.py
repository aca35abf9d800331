"""Typed Python client of the advplugin REST service: `Client` (sync) and `AsyncClient`.

Depends on httpx only (and `advplugin.errors`, which imports nothing), nothing of the server
(an application embeds it without FastAPI, FAISS or dlib). Results are `TypedDict`s: typed
for a checker, plain dicts at run time, so code written against the JSON keeps working.
Errors raise `ApiError` (an `advplugin.errors.RemoteError`) with the envelope's status, code
and message. A `429 busy` or `503` with `Retry-After` is retried (`retries` times, sleeping
what the server asks, at most `max_retry_wait` seconds).

Templates (client-side protection) are sequences of float sequences, or anything with
`tolist()` such as numpy arrays: protect them with the gallery's key first
(`examples/client.py`, `LocalProtector`); the service never sees an image or a raw embedding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict
from urllib.parse import quote

import httpx

from advplugin.errors import RemoteError


# -- results ---------------------------------------------------------------------------------------
class Box(TypedDict):
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    probability: float  # the detector's confidence in [0, 1]
    score: float | None  # the detector's own score (dlib: an SVM margin)


class EnrolledTemplate(TypedDict):
    template_id: int
    box: Box | None


class EnrollResult(TypedDict):
    subject: str
    templates: list[EnrolledTemplate]


class SubjectSimilarity(TypedDict):
    subject: str
    #: the band of the match (0.85 / 0.90 / 0.95 / 0.99), or the exact score for a key
    #: granted exact scores (docs/service.md, "What an answer reveals")
    similarity: float


class FaceResult(TypedDict, total=False):
    box: Box | None
    subjects: list[SubjectSimilarity]


class IdentifyResult(TypedDict):
    result: list[FaceResult]


class VerifyResult(TypedDict):
    subject: str
    #: the band of a match, None when not verified (exact-scores keys: the score)
    similarity: float | None
    verified: bool
    box: Box | None


class EnrolledItem(TypedDict):
    subject: str
    template_id: int


class EnrollTemplatesResult(TypedDict):
    templates: list[EnrolledItem]


class Subject(TypedDict):
    subject: str
    template_count: int
    created_at: str  # ISO 8601, with its UTC offset


class SubjectPage(TypedDict):
    subjects: list[Subject]
    page: int
    size: int
    total: int


class DeleteResult(TypedDict):
    subject: str
    deleted_templates: int


class TemplateProvenance(TypedDict):
    """What made client templates (the request's `protection` field): must match the
    gallery's (`status()` tells)."""

    scheme: str
    scheme_version: int
    key_id: str | None
    extractor_name: str
    extractor_version: str


Status = dict[str, Any]  # mode, scheme, key id, counts, index, keys: see docs/service.md
Templates = Sequence[Sequence[float]] | Any  # or an array with tolist()


class ApiError(RemoteError):
    """An error answer of the service (`{"error": {"code", "message"}}`). The client's kind of
    `advplugin.errors.AdvpluginError` (a `RemoteError`, a `RuntimeError`): catching the base
    catches it too."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


#: Earlier names, kept because the client is public API (docs/service.md): `AdvpluginError` was
#: the client's error before `ApiError` (distinct from `advplugin.errors.AdvpluginError`, its
#: base), `Protection` the provenance type before `TemplateProvenance`.
AdvpluginError = ApiError
Protection = TemplateProvenance


# -- requests, shared by both clients ----------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _rows(templates: Templates) -> list[list[float]]:
    return templates.tolist() if hasattr(templates, "tolist") else [list(map(float, t)) for t in templates]


def _subject_path(subject: str) -> str:
    return f"/subjects/{quote(subject, safe='')}"  # whole: a name may hold / ? # %


def _enroll(subject: str, image: bytes, faces: Literal["largest", "all"]) -> _Request:
    return _Request("POST", "/enroll", {"files": {"file": ("image", image)},
                                        "data": {"subject": subject, "faces": faces}})


def _identify(image: bytes, prediction_count: int, limit: int, threshold: float | None) -> _Request:
    params: dict[str, Any] = {"prediction_count": prediction_count, "limit": limit}
    if threshold is not None:
        params["threshold"] = threshold
    return _Request("POST", "/identify", {"files": {"file": ("image", image)}, "params": params})


def _verify(subject: str, image: bytes, threshold: float | None) -> _Request:
    data = {"subject": subject} | ({"threshold": str(threshold)} if threshold is not None else {})
    return _Request("POST", "/verify", {"files": {"file": ("image", image)}, "data": data})


def _enroll_templates(subjects: Sequence[str], templates: Templates, protection: TemplateProvenance) -> _Request:
    rows = _rows(templates)
    if len(rows) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects for {len(rows)} templates")
    items = [{"subject": s, "template": t} for s, t in zip(subjects, rows, strict=True)]
    return _Request("POST", "/enroll/templates", {"json": {"protection": protection, "items": items}})


def _identify_templates(
    templates: Templates, protection: TemplateProvenance, prediction_count: int, threshold: float | None
) -> _Request:
    body = {"protection": protection, "templates": _rows(templates),
            "prediction_count": prediction_count, "threshold": threshold}
    return _Request("POST", "/identify/templates", {"json": body})


def _result(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    retry = response.headers.get("retry-after")
    raise ApiError(
        response.status_code, str(err.get("code", "http_error")), str(err.get("message", response.reason_phrase)),
        float(retry) if retry and retry.isdigit() else None,
    )


def _wait(error: ApiError, attempt: int, retries: int, max_wait: float) -> float | None:
    """Seconds to wait before retrying, or None to give up."""
    if attempt >= retries or error.status not in (429, 503) or error.retry_after is None:
        return None
    return min(error.retry_after, max_wait)


class _Base:
    def __init__(self, retries: int, max_retry_wait: float) -> None:
        self.retries, self.max_retry_wait = retries, max_retry_wait


class Client(_Base):
    """Synchronous client; use as a context manager or call `close()`."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 120, retries: int = 3,
                 max_retry_wait: float = 10) -> None:
        super().__init__(retries, max_retry_wait)
        self.http = httpx.Client(base_url=url, headers={"x-api-key": api_key}, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, req: _Request) -> Any:
        attempt = 0
        while True:
            try:
                return _result(self.http.request(req.method, req.path, **req.kwargs))
            except ApiError as e:
                wait = _wait(e, attempt, self.retries, self.max_retry_wait)
                if wait is None:
                    raise
            time.sleep(wait)
            attempt += 1

    # images: the server extracts and protects
    def enroll(self, subject: str, image: bytes, *, faces: Literal["largest", "all"] = "largest") -> EnrollResult:
        return self._send(_enroll(subject, image, faces))

    def identify(self, image: bytes, *, prediction_count: int = 1, limit: int = 0,
                 threshold: float | None = None) -> IdentifyResult:
        return self._send(_identify(image, prediction_count, limit, threshold))

    def verify(self, subject: str, image: bytes, *, threshold: float | None = None) -> VerifyResult:
        return self._send(_verify(subject, image, threshold))

    # protected templates: protection happened on this side
    def enroll_templates(self, subjects: Sequence[str], templates: Templates,
                         protection: TemplateProvenance) -> EnrollTemplatesResult:
        return self._send(_enroll_templates(subjects, templates, protection))

    def identify_templates(self, templates: Templates, protection: TemplateProvenance, *, prediction_count: int = 1,
                           threshold: float | None = None) -> IdentifyResult:
        return self._send(_identify_templates(templates, protection, prediction_count, threshold))

    # gallery
    def subjects(self, page: int = 0, size: int = 100) -> SubjectPage:
        return self._send(_Request("GET", "/subjects", {"params": {"page": page, "size": size}}))

    def subject(self, subject: str) -> Subject:
        return self._send(_Request("GET", _subject_path(subject)))

    def delete_subject(self, subject: str) -> DeleteResult:
        return self._send(_Request("DELETE", _subject_path(subject)))

    def status(self) -> Status:
        return self._send(_Request("GET", "/status"))

    def health(self) -> dict[str, str]:
        return self._send(_Request("GET", "/health"))


class AsyncClient(_Base):
    """Asynchronous client (the same methods, awaited); `async with` or `await aclose()`."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 120, retries: int = 3,
                 max_retry_wait: float = 10) -> None:
        super().__init__(retries, max_retry_wait)
        self.http = httpx.AsyncClient(base_url=url, headers={"x-api-key": api_key}, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, req: _Request) -> Any:
        attempt = 0
        while True:
            try:
                return _result(await self.http.request(req.method, req.path, **req.kwargs))
            except ApiError as e:
                wait = _wait(e, attempt, self.retries, self.max_retry_wait)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    async def enroll(self, subject: str, image: bytes, *,
                     faces: Literal["largest", "all"] = "largest") -> EnrollResult:
        return await self._send(_enroll(subject, image, faces))

    async def identify(self, image: bytes, *, prediction_count: int = 1, limit: int = 0,
                       threshold: float | None = None) -> IdentifyResult:
        return await self._send(_identify(image, prediction_count, limit, threshold))

    async def verify(self, subject: str, image: bytes, *, threshold: float | None = None) -> VerifyResult:
        return await self._send(_verify(subject, image, threshold))

    async def enroll_templates(self, subjects: Sequence[str], templates: Templates,
                               protection: TemplateProvenance) -> EnrollTemplatesResult:
        return await self._send(_enroll_templates(subjects, templates, protection))

    async def identify_templates(self, templates: Templates, protection: TemplateProvenance, *,
                                 prediction_count: int = 1, threshold: float | None = None) -> IdentifyResult:
        return await self._send(_identify_templates(templates, protection, prediction_count, threshold))

    async def subjects(self, page: int = 0, size: int = 100) -> SubjectPage:
        return await self._send(_Request("GET", "/subjects", {"params": {"page": page, "size": size}}))

    async def subject(self, subject: str) -> Subject:
        return await self._send(_Request("GET", _subject_path(subject)))

    async def delete_subject(self, subject: str) -> DeleteResult:
        return await self._send(_Request("DELETE", _subject_path(subject)))

    async def status(self) -> Status:
        return await self._send(_Request("GET", "/status"))

    async def health(self) -> dict[str, str]:
        return await self._send(_Request("GET", "/health"))


__all__ = [
    "AdvpluginError", "ApiError", "AsyncClient", "Box", "Client", "DeleteResult", "EnrollResult",
    "EnrollTemplatesResult", "IdentifyResult", "Protection", "Status", "Subject", "SubjectPage",
    "TemplateProvenance", "VerifyResult",
]
