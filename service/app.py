"""The HTTP API: POST /segment and /segment/batch, probes, metrics and model information."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.decode import check_media_type
from service.errors import ApiError
from service.metrics import Metrics
from service.pipeline import Options, Pipeline
from service.runtime import probe
from service.schemas import SEGMENT_RESPONSES, UNAUTHORIZED, BatchResult, NotReady, Ready, SegmentResult, image_body
from service.settings import ServeSettings, Task

log = logging.getLogger(__name__)

# Probes and Prometheus (its pod annotations cannot send a token; counts and timings, no images) never need
# the API key; the demo page asks for it.
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/"}
DEMO_PAGE = Path(__file__).parent / "static" / "index.html"


TaskParam = Annotated[Task | None, Query(description="default: the server's default_task")]
ThresholdParam = Annotated[
    float | None, Query(ge=0, le=1, description="panoptic object-mask threshold, or instance score threshold")
]
OverlapParam = Annotated[float | None, Query(ge=0, le=1, description="panoptic: least kept fraction of a mask")]
MaxSegmentsParam = Annotated[int | None, Query(ge=1, le=10_000)]


class FastJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def package_version() -> str:
    """The installed package's version; a source tree run from PYTHONPATH, never pip-installed, has none."""
    try:
        return metadata.version("maskformer-serving")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def error_response(err: ApiError) -> FastJSON:
    return FastJSON(err.body(), status_code=err.status, headers=err.headers)


class Guard:
    """Pure ASGI middleware: the optional API key, request counts and latency per endpoint, nosniff, and
    while draining `Connection: close`, so keep-alive clients reconnect (elsewhere) instead of reusing a
    connection the server is about to close under them."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, metrics: Metrics, endpoints: frozenset[str], status: dict[str, Any]
    ):
        self.app, self.metrics, self.endpoints, self.status = app, metrics, endpoints, status
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"  # unknown paths share one label
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-content-type-options", b"nosniff")]  # a body is only what its type says
                if self.status["draining"]:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            if self.expected and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    return await error_response(errors.unauthorized())(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.body_too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise errors.body_too_large(limit)
    except ClientDisconnect:  # gone mid-upload: the same 499 as a client that leaves while queued
        raise errors.client_closed() from None
    return bytes(body)


def too_many_images(count: str, many: bool, limit: int) -> ApiError:
    if not many:
        return errors.invalid_parameter("POST /segment takes one image; use /segment/batch for several")
    return errors.invalid_parameter(f"{count} images exceed the limit of {limit}")


async def read_images(request: Request, settings: ServeSettings, many: bool) -> list[bytes]:
    """The image(s) of a request: multipart field(s) `image`, or the raw body with an image/* type."""
    body = await read_body(request, settings.max_body_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":  # media types ignore case
        replayed = False

        async def replay() -> Message:  # hand the already-read body to Starlette's form parser
            nonlocal replayed
            if replayed:
                return await request.receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        limit = settings.max_batch_images
        try:
            form = await Request(request.scope, replay).form(max_files=limit + 1)  # one over: the 422 below
        except Exception as err:  # Starlette re-raises its parser's MultiPartException as HTTPException(400)
            detail = str(getattr(err, "detail", err))
            if detail.startswith("Too many files"):  # the parser stops counting past max_files
                raise too_many_images(f"more than {limit + 1}", many, limit) from None
            raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed: {detail}") from None
        fields = form.getlist("image")
        images = [await f.read() if hasattr(f, "read") else str(f).encode() for f in fields]
        await form.close()
        if not images:
            raise errors.missing_image()
    elif not body and not content_type:
        raise errors.missing_image()
    else:
        check_media_type(content_type)
        images = [body]
    if len(images) > (settings.max_batch_images if many else 1):
        raise too_many_images(str(len(images)), many, settings.max_batch_images)
    return images


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: ServeSettings, on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    metrics = Metrics(settings.max_batch_size)
    pipeline = Pipeline(settings, metrics)
    state: dict[str, Any] = {"ready": False, "draining": False, "loading": False, "load_error": None}
    # read at each scrape, so the gauge drops the moment SIGTERM sets "draining" (service/server.py)
    metrics.ready.set_function(lambda: float(state["ready"] and not state["draining"]))

    def load_in_thread() -> None:
        try:
            pipeline.load()
        finally:  # cleared by the thread itself: cancelling load() below does not stop the thread
            state["loading"] = False

    async def load() -> None:
        state["loading"] = True
        try:
            await asyncio.to_thread(load_in_thread)
        except Exception as err:
            log.exception("the backend failed to load")
            state["load_error"] = f"{type(err).__name__}: {err}"
            if on_load_error:
                on_load_error(err)
            return
        pipeline.start()
        state["ready"] = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        yield
        state["draining"] = True
        loading.cancel()
        await pipeline.drain()

    app = FastAPI(
        title="MaskFormer",
        version=package_version(),
        description="Semantic, panoptic and instance segmentation with MaskFormer; masks as COCO RLE.",
        lifespan=lifespan,
        default_response_class=FastJSON,
    )
    app.state.pipeline, app.state.status = pipeline, state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors())
        return error_response(errors.invalid_parameter(detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error (error id %s)", error_id, exc_info=err)
        return error_response(ApiError(500, "internal", f"internal error; the server log has error id {error_id}"))

    def options(
        task: TaskParam = None,
        threshold: ThresholdParam = None,
        overlap_threshold: OverlapParam = None,
        max_segments: MaxSegmentsParam = None,
    ) -> Options:
        """The query parameters of both segment endpoints, with the server's defaults filled in."""
        return Options(
            task or settings.default_task,
            settings.threshold if threshold is None else threshold,
            settings.overlap_threshold if overlap_threshold is None else overlap_threshold,
            max_segments,
        )

    async def serve_images(request: Request, opts: Options, many: bool) -> list[dict[str, Any]]:
        deadline = time.monotonic() + settings.request_timeout_s
        if not state["ready"]:  # while draining, requests that still arrive are served (drain_grace_s)
            raise errors.not_ready("the model is still loading")
        images = await read_images(request, settings, many)
        # all decoded first: one bad image refuses the request before any of its images takes a forward pass
        decoded = await asyncio.gather(*(pipeline.decode(data) for data in images))
        tasks = [asyncio.create_task(pipeline.segment_decoded(d, opts, deadline)) for d in decoded]
        work: asyncio.Future[Any] = asyncio.gather(*tasks)  # fails with the first image that fails
        gone: asyncio.Future[Any] = asyncio.create_task(until_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise errors.client_closed()
            return work.result()
        finally:
            # An answered error, a client that left or this handler's own cancellation: the request's other
            # images leave the queue rather than take forward passes no one will read.
            gone.cancel()
            for task in tasks:
                task.cancel()
            # Read what ends them (CancelledError included), or asyncio logs an ERROR for each.
            for future in (work, *tasks):
                future.add_done_callback(lambda f: f.cancelled() or f.exception())

    @app.post(
        "/segment",
        openapi_extra={"requestBody": image_body(many=False)},
        responses={200: {"model": SegmentResult}, **SEGMENT_RESPONSES},
    )
    async def segment(request: Request, opts: Options = Depends(options)) -> Response:
        return FastJSON((await serve_images(request, opts, many=False))[0])

    @app.post(
        "/segment/batch",
        openapi_extra={"requestBody": image_body(many=True)},
        responses={200: {"model": BatchResult}, **SEGMENT_RESPONSES},
    )
    async def segment_batch(request: Request, opts: Options = Depends(options)) -> Response:
        return FastJSON({"results": await serve_images(request, opts, many=True)})

    @app.get("/", include_in_schema=False)
    async def demo_page() -> Response:
        return FileResponse(DEMO_PAGE, media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", responses={200: {"model": Ready}, 503: {"model": NotReady}})
    async def readyz() -> Response:
        if state["ready"] and not state["draining"]:
            return FastJSON({"status": "ready", "warm_batch_sizes": pipeline.warm_batch_sizes})
        reason = "draining" if state["draining"] else state["load_error"] or "loading"
        return FastJSON({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", responses=UNAUTHORIZED)
    async def model_info() -> dict[str, Any]:
        caps = probe()
        info, cfg, backend = pipeline.info, pipeline.cfg, pipeline.backend
        return {
            "name": info.name,
            "version": info.version,
            "classes": [
                {"id": i, "name": n, "isthing": t} for i, (n, t) in enumerate(zip(info.class_names, info.isthing))
            ],
            "input_size": list(cfg.input_size),
            **(backend.describe() if backend else {"backend": None}),
            "max_batch_size": settings.max_batch_size,
            "overlap_postprocessing": pipeline.overlaps_postprocessing() if backend else None,
            "gpu_preprocessing": pipeline.decodes_on_gpu() if backend else None,
            "default_task": settings.default_task,
            "versions": {
                "maskformer": package_version(),
                "python": caps.python,
                "torch": caps.torch,
                "onnxruntime": caps.onnxruntime,
                "tensorrt": caps.tensorrt,
            },
        }

    app.add_middleware(
        Guard,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        metrics=metrics,
        endpoints=frozenset(getattr(r, "path", "") for r in app.routes),  # the routes exist now
        status=state,
    )
    return app
