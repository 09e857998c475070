"""A typed Python client for the service, over httpx, sync (`Client`) and async (`AsyncClient`).

    with Client("http://localhost:8000") as client:
        result = client.segment("street.jpg", task="panoptic")
    for seg in result.segments:
        print(seg.label, seg.score, seg.mask.shape)  # mask: [H, W] bool, decoded with pycocotools
    result.render("street.jpg").save("street.overlay.png")

An image is a path, encoded bytes, a PIL image or an [H, W, 3] uint8 RGB array (PIL images and arrays are
sent as PNG). Error responses raise `ServiceError` with the API's status, code and message.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from service import overlay

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


class ServiceError(Exception):
    """An error answer: HTTP status, the API's `code` and `message`, and for a 429 or 503 the seconds its
    Retry-After asks a client to wait (None where it gave none)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass
class Segment:
    id: int
    label_id: int
    label: str
    isthing: bool
    score: float
    area: int
    bbox: tuple[float, float, float, float]  # COCO [x, y, w, h]
    mask: np.ndarray  # [H, W] bool at the original image size

    @classmethod
    def from_json(cls, seg: dict[str, Any]) -> Segment:
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode("ascii")}
        return cls(
            seg["id"],
            seg["label_id"],
            seg["label"],
            seg["isthing"],
            seg["score"],
            seg["area"],
            tuple(seg["bbox"]),
            mask_utils.decode(rle).astype(bool),
        )


@dataclass
class Prediction:
    task: str
    width: int
    height: int
    model: dict[str, str]
    segments: list[Segment]
    timing_ms: dict[str, float]
    raw: dict[str, Any] = field(repr=False)  # the response JSON as the service sent it

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        segments = [Segment.from_json(s) for s in body["segments"]]
        return cls(body["task"], body["width"], body["height"], body["model"], segments, body["timing_ms"], body)

    def overlay(self, image: ImageInput, labels: bool = True) -> Image.Image:
        """The image with the masks blended in; outlines on things unless the task is semantic."""
        return overlay.overlay(load_rgb(image), self.segments, self.task != "semantic", labels)

    def render(self, image: ImageInput, labels: bool = True) -> Image.Image:
        """The overlay with a legend of the classes present (what `maskformer predict` writes)."""
        return overlay.render(load_rgb(image), self.segments, self.task != "semantic", labels)


def encode_image(image: ImageInput) -> tuple[str, bytes]:
    """(file name, encoded bytes) to upload."""
    if isinstance(image, bytes):
        return "image", image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(overlay.as_rgb(image))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "image.png", buf.getvalue()
    raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")


def load_rgb(image: ImageInput) -> np.ndarray:
    """[H, W, 3] uint8, upright as the service sees it (EXIF orientation applied), to draw on."""
    if isinstance(image, np.ndarray):
        return overlay.as_rgb(image)
    from service.decode import decode, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    return decode(encode_image(image)[1], max_pixels=2**40)


def _params(task: str | None, threshold: float | None, overlap: float | None, max_segments: int | None) -> dict:
    given = {"task": task, "threshold": threshold, "overlap_threshold": overlap, "max_segments": max_segments}
    return {k: v for k, v in given.items() if v is not None}


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.is_success:
        try:
            body = response.json()
        except ValueError:  # a proxy's HTML page, say
            body = None
        if not isinstance(body, dict):
            text = response.text[:200]
            raise ServiceError(response.status_code, "not_json", f"the answer is not a JSON object: {text}")
        return body
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    try:
        retry_after = float(response.headers["Retry-After"])
    except (KeyError, ValueError):  # absent, or an HTTP date (the service sends seconds)
        retry_after = None
    raise ServiceError(response.status_code, code, message, retry_after)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 60.0):
        self.http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)

    def segment_json(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> dict[str, Any]:
        """POST /segment; the response JSON as sent (masks still RLE)."""
        params = _params(task, threshold, overlap_threshold, max_segments)
        return _json(self.http.post("/segment", params=params, files={"image": encode_image(image)}))

    def segment(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> Prediction:
        """POST /segment; masks decoded to numpy."""
        return Prediction.from_json(self.segment_json(image, task, threshold, overlap_threshold, max_segments))

    def segment_batch(
        self,
        images: Sequence[ImageInput],
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> list[Prediction]:
        """POST /segment/batch: one request, one prediction per image, in order."""
        params = _params(task, threshold, overlap_threshold, max_segments)
        files = [("image", encode_image(image)) for image in images]
        body = _json(self.http.post("/segment/batch", params=params, files=files))
        return [Prediction.from_json(r) for r in body["results"]]

    def model(self) -> dict[str, Any]:
        """GET /v1/model: classes, input size, backend, versions."""
        return _json(self.http.get("/v1/model"))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 60.0):
        self.http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)

    async def segment_json(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> dict[str, Any]:
        params = _params(task, threshold, overlap_threshold, max_segments)
        return _json(await self.http.post("/segment", params=params, files={"image": encode_image(image)}))

    async def segment(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> Prediction:
        return Prediction.from_json(await self.segment_json(image, task, threshold, overlap_threshold, max_segments))

    async def segment_batch(
        self,
        images: Sequence[ImageInput],
        task: str | None = None,
        threshold: float | None = None,
        overlap_threshold: float | None = None,
        max_segments: int | None = None,
    ) -> list[Prediction]:
        params = _params(task, threshold, overlap_threshold, max_segments)
        files = [("image", encode_image(image)) for image in images]
        body = _json(await self.http.post("/segment/batch", params=params, files=files))
        return [Prediction.from_json(r) for r in body["results"]]

    async def model(self) -> dict[str, Any]:
        return _json(await self.http.get("/v1/model"))

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
