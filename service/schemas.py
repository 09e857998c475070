"""The OpenAPI description of the responses, so clients (and schemathesis, in tests) can check every body.

The handlers build plain dicts for speed (orjson); these models only document them. Every status an
endpoint can answer is listed, with the error body of service/errors.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.decode import MEDIA_TYPES
from service.settings import Task


class ErrorDetail(BaseModel):
    code: str = Field(description="stable and machine-readable, e.g. invalid_image, queue_full")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Rle(BaseModel):
    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    counts: str = Field(description="COCO compressed RLE, column-major")


class Segment(BaseModel):
    id: int
    label_id: int
    label: str
    isthing: bool
    score: float
    area: int
    bbox: list[int] = Field(min_length=4, max_length=4, description="COCO [x, y, w, h]")
    rle: Rle


class ModelName(BaseModel):
    name: str
    version: str | None


class SegmentResult(BaseModel):
    task: Task
    width: int
    height: int
    model: ModelName
    segments: list[Segment]
    timing_ms: dict[str, float]


class BatchResult(BaseModel):
    results: list[SegmentResult]


class Ready(BaseModel):
    status: str
    warm_batch_sizes: list[int]


class NotReady(BaseModel):
    status: str
    reason: str


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: _error("an API key is configured and was not given")}
SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    400: _error("not a readable image, an empty body or a malformed multipart body"),
    413: _error("the body or the image's pixel count is over the limit"),
    415: _error("an image format or Content-Type that is not served"),
    422: _error("a bad query parameter, or no image"),
    500: _error("inference failed; the message has an error id for the server log"),
    503: _error("the queue is full, or the server is loading or draining", headers=RETRY_AFTER),
    504: _error("not answered within the request timeout"),
}


def image_body(many: bool) -> dict[str, Any]:
    """The request body: multipart field(s) `image`, or the raw image with its own media type."""
    binary = {"type": "string", "format": "binary"}
    field = {"type": "array", "items": binary, "minItems": 1} if many else binary
    multipart = {"type": "object", "properties": {"image": field}, "required": ["image"]}
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": multipart}, **{m: {"schema": binary} for m in MEDIA_TYPES}},
    }
