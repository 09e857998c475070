"""POST /segment against a live uvicorn on loopback, through httpx, on a small random-init model."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.checkpoint import load_model, save_model
from model.inference import prepare_for_inference
from model.maskformer import ModelInfo, build_model
from model.postprocess import postprocess
from service.backends import create_backend
from service.decode import decode, prepare
from service.settings import ServeSettings
from tests.conftest import tiny_config
from tests.images import awkward, encode, rgb
from tests.live_server import counter, live_server, metric, wait_until

CLASSES = (["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_model(build_model(tiny_config(128), ModelInfo("tiny-test", *CLASSES, version="3")), path)
    return path


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    settings = ServeSettings(
        weights=weights,
        backend="torch",
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_batch_size=4,
        max_queue_delay_ms=30,
        max_body_bytes=2_000_000,
        max_image_pixels=4_000_000,
        request_timeout_s=20,
    )
    with live_server(settings) as (url, app):
        yield url, app


def decode_rle(segment):
    return mask_utils.decode(segment["rle"])


def png(img=None) -> bytes:
    return encode(img or rgb(120, 160, seed=1), "PNG")


@contextmanager
def patched_backend(app, infer):
    """Swap the live backend's forward pass (to make it slow or failing), restoring it afterwards."""
    backend = app.state.pipeline.backend
    original = backend.infer
    backend.infer = lambda images: infer(original, images)
    try:
        yield
    finally:
        backend.infer = original


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_served_masks_equal_in_process_postprocessing(server, weights, task):
    url, _ = server
    data = png()
    r = httpx.post(f"{url}/segment", params={"task": task, "threshold": 0.0}, files={"image": ("x.png", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task"], body["width"], body["height"]) == (task, 160, 120)
    assert body["model"] == {"name": "tiny-test", "version": "3"}
    assert set(body["timing_ms"]) == {"decode", "queue", "infer", "postprocess", "encode"}

    # the torch backend's model: batch norms folded (equal up to rounding, and panoptic ties follow rounding)
    model = prepare_for_inference(load_model(weights), torch.device("cpu"), "fp32")
    d = prepare(decode(data, 10**7), model.cfg.input_size, model.cfg.pixel_mean)
    with torch.inference_mode():
        out = model(d.input[None].float())
    [expected] = postprocess(out, task, CLASSES[1], [d.image_size], [d.orig_size], 0.0)
    assert len(body["segments"]) == len(expected.segments) > 0
    union = np.zeros((120, 160), np.int64)
    for seg, exp in zip(body["segments"], expected.segments):
        m = decode_rle(seg)
        assert np.array_equal(m, expected.mask(exp).numpy().astype(np.uint8))
        assert seg["area"] == m.sum() == mask_utils.area(seg["rle"])
        assert seg["bbox"] == mask_utils.toBbox(seg["rle"]).tolist()
        assert seg["label"] == CLASSES[0][seg["label_id"]] and seg["isthing"] == CLASSES[1][seg["label_id"]]
        union += m
    if task == "semantic":
        assert (union == 1).all()  # one segment per class, covering every pixel
    if task == "panoptic":
        assert union.max() <= 1  # disjoint


def test_raw_body_and_batch_endpoint(server):
    url, _ = server
    for media in ("image/png", "IMAGE/PNG"):  # media types ignore case, multipart's too
        r = httpx.post(f"{url}/segment?task=semantic", content=png(), headers={"Content-Type": media})
        assert r.status_code == 200 and r.json()["width"] == 160
    form = httpx.Request("POST", url, files={"image": ("x.png", png())})
    shouted = form.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")
    r = httpx.post(f"{url}/segment", content=form.read(), headers={"Content-Type": shouted})
    assert r.status_code == 200 and r.json()["width"] == 160
    sizes = [(50, 70), (90, 30), (64, 64)]
    files = [("image", (f"{i}.png", encode(rgb(h, w, seed=i), "PNG"))) for i, (h, w) in enumerate(sizes)]
    r = httpx.post(f"{url}/segment/batch?task=instance", files=files)
    assert r.status_code == 200
    assert [(x["height"], x["width"]) for x in r.json()["results"]] == sizes


@pytest.mark.parametrize("name", sorted(awkward()))
@pytest.mark.parametrize("upload", ["raw", "multipart"])
def test_awkward_images_are_served(server, name, upload):
    url, _ = server
    data, media, (h, w) = awkward()[name]
    if upload == "raw":
        r = httpx.post(f"{url}/segment?task=semantic", content=data, headers={"Content-Type": media})
    else:  # a form upload names no format the server could trust: it goes by the bytes alone
        r = httpx.post(f"{url}/segment?task=semantic", files={"image": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["height"], body["width"]) == (h, w)
    assert sum(decode_rle(s).sum() for s in body["segments"]) == h * w


def test_max_segments_caps_and_overlap_threshold_filters(server):
    url, _ = server

    def segments(**params) -> list[dict]:
        r = httpx.post(f"{url}/segment", params={"threshold": 0.0, **params}, files={"image": ("x.png", png())})
        assert r.status_code == 200, r.text
        return r.json()["segments"]

    every = segments(task="instance")
    assert len(every) > 1
    assert segments(task="instance", max_segments=1) == every[:1]  # the best-scoring one
    # Panoptic drops a segment that keeps less than overlap_threshold of its own mask after the pixels are
    # shared out; 0 keeps every segment that owns a pixel, 1 only those that lost none.
    loose, strict = segments(task="panoptic", overlap_threshold=0.0), segments(task="panoptic", overlap_threshold=1.0)
    assert len(loose) > len(strict) >= 1
    assert len(segments(task="panoptic", overlap_threshold=0.0, max_segments=1)) == 1


BAD = {
    "not-an-image": (dict(content=b"hello", headers={"Content-Type": "image/png"}), 400, "invalid_image"),
    "truncated": (dict(content=png()[:200], headers={"Content-Type": "image/png"}), 400, "invalid_image"),
    "zero-bytes": (dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty_body"),
    "gif": (dict(files={"image": ("x.gif", encode(rgb(), "GIF"))}), 415, "unsupported_media_type"),
    "text-body": (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    "body-over-limit": (dict(content=b"\0" * 2_000_001, headers={"Content-Type": "image/png"}), 413, "body_too_large"),
    "pixels-over-limit": (
        dict(content=encode(Image.new("RGB", (2000, 2100)), "PNG"), headers={"Content-Type": "image/png"}),
        413,
        "image_too_large",
    ),
    "missing-image": (dict(), 422, "missing_image"),
    "multipart-without-image": (dict(files={"other": ("x.png", png())}), 422, "missing_image"),
    "bad-task": (dict(params={"task": "depth"}, files={"image": ("x.png", png())}), 422, "invalid_parameter"),
    "bad-threshold": (dict(params={"threshold": "2"}, files={"image": ("x.png", png())}), 422, "invalid_parameter"),
    "nan-threshold": (dict(params={"threshold": "nan"}, files={"image": ("x.png", png())}), 422, "invalid_parameter"),
    "bad-overlap-threshold": (
        dict(params={"overlap_threshold": "1.5"}, files={"image": ("x.png", png())}),
        422,
        "invalid_parameter",
    ),
    "bad-max-segments": (
        dict(params={"max_segments": "0"}, files={"image": ("x.png", png())}),
        422,
        "invalid_parameter",
    ),
    "two-images": (dict(files=[("image", ("a.png", png())), ("image", ("b.png", png()))]), 422, "invalid_parameter"),
    # past the form parser's file limit (max_batch_images + 1): the same 422, not a parser's 400
    "34-images": (dict(files=[("image", (f"{i}.png", png())) for i in range(34)]), 422, "invalid_parameter"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_gets_a_json_error_and_the_server_stays_ready(server, name):
    url, _ = server
    kwargs, status, code = BAD[name]
    r = httpx.post(f"{url}/segment", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert httpx.get(f"{url}/readyz").status_code == 200


async def _concurrent(url: str, n: int, **kwargs) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/segment", files={"image": ("x.png", png())}, **kwargs) for _ in range(n))
        )


def test_concurrent_requests_are_batched(server):
    url, _ = server
    before_count, before_sum = metric(url, "maskformer_batch_size_count"), metric(url, "maskformer_batch_size_sum")
    responses = asyncio.run(_concurrent(url, 12, params={"task": "panoptic"}))
    assert all(r.status_code == 200 for r in responses)
    batches = metric(url, "maskformer_batch_size_count") - before_count
    images = metric(url, "maskformer_batch_size_sum") - before_sum
    assert images == 12 and batches < 12  # some forward passes carried more than one image


def test_queue_depth_falls_when_a_batch_leaves_the_queue(server):
    url, app = server
    entered, release = threading.Event(), threading.Event()

    def held(infer, images):
        entered.set()
        release.wait(30)
        return infer(images)

    with patched_backend(app, held), ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/segment", files={"image": ("x.png", png())}, timeout=60)
        try:
            assert entered.wait(30)
            running = metric(url, "maskformer_queue_depth")  # its batch runs; nothing waits
        finally:
            release.set()
        assert pending.result().status_code == 200
    assert running == 0


def test_mixed_tasks_share_a_batch(server):
    url, app = server
    calls = []

    def record(infer, images):
        calls.append(len(images))
        time.sleep(0.2)
        return infer(images)

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{url}/segment", params={"task": t}, files={"image": ("x.png", png())})
                    for t in ["semantic", "panoptic", "instance", "semantic"]
                )
            )

    with patched_backend(app, record):
        responses = asyncio.run(run())
    assert [r.json()["task"] for r in responses] == ["semantic", "panoptic", "instance", "semantic"]
    assert max(calls) > 1


def test_overload_gets_503_with_retry_after(server):
    url, app = server
    batcher = app.state.pipeline.batcher

    def slow(infer, images):
        time.sleep(0.5)
        return infer(images)

    old = batcher.max_queue_size
    batcher.max_queue_size = 2
    try:
        with patched_backend(app, slow):
            responses = asyncio.run(_concurrent(url, 16))
    finally:
        batcher.max_queue_size = old
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers["Retry-After"] == "1" for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert any(r.status_code == 200 for r in responses)
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_timeout_gets_504_and_a_backend_error_fails_only_its_batch(server, caplog):
    url, app = server
    settings = app.state.pipeline.settings

    def slow(infer, images):
        time.sleep(1.5)
        return infer(images)

    settings.request_timeout_s = 0.5
    try:
        with patched_backend(app, slow):
            r = httpx.post(f"{url}/segment", files={"image": ("x.png", png())}, timeout=30)
    finally:
        settings.request_timeout_s = 20
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"

    def broken(infer, images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with patched_backend(app, broken):
        r = httpx.post(f"{url}/segment", files={"image": ("x.png", png())})
    assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
    error_id = re.fullmatch(r".*error id ([0-9a-f]+)", r.json()["error"]["message"]).group(1)
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR and error_id in rec.getMessage()]
    assert logged and "illegal memory access" in str(logged[0].exc_info[1])  # the log has the id and the cause
    assert httpx.post(f"{url}/segment", files={"image": ("x.png", png())}).status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_disconnected_client_is_dropped_from_the_queue(server):
    url, app = server
    seen = []
    closed = 'maskformer_requests_total{endpoint="/segment",status="499"}'
    closed_before = counter(url, closed)

    def slow(infer, images):
        seen.append(len(images))
        time.sleep(1.0)
        return infer(images)

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.create_task(client.post(f"{url}/segment", files={"image": ("a.png", png())}))
            await asyncio.sleep(0.3)  # the first batch is running
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"{url}/segment", files={"image": ("b.png", png())}, timeout=0.3)
            return await first

    with patched_backend(app, slow):
        assert asyncio.run(run()).status_code == 200
        time.sleep(1.2)  # time for the batcher to run anything still queued
    assert seen == [1]  # the abandoned request never reached the backend
    assert counter(url, closed) == closed_before + 1  # counted as 499, a client that left first


def test_probes_model_info_docs_and_metrics(server):
    url, _ = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready" and ready["warm_batch_sizes"] == [1, 2, 3, 4]
    info = httpx.get(f"{url}/v1/model").json()
    assert info["classes"][2] == {"id": 2, "name": "circle", "isthing": True}
    assert info["input_size"] == [128, 128] and info["backend"] == "torch" and info["precision"] == "fp32"
    assert info["versions"]["torch"] == torch.__version__
    assert info["overlap_postprocessing"] is True  # the torch backend on the CPU allows it, and it is on
    assert httpx.get(f"{url}/docs").status_code == 200
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/segment", "/segment/batch", "/healthz", "/readyz", "/metrics", "/v1/model"} <= set(spec["paths"])
    assert "401" not in spec["paths"]["/metrics"]["get"]["responses"]  # open, as the probes are
    text = httpx.get(f"{url}/metrics").text
    for name in [
        "maskformer_requests_total",
        "maskformer_request_latency_seconds_bucket",
        "maskformer_queue_depth",
        "maskformer_batch_size_bucket",
        'maskformer_stage_seconds_bucket{le="0.005",stage="infer"}',
    ]:
        assert name in text, name
    assert metric(url, 'maskformer_requests_total{endpoint="/segment",status="200"}') > 0


def test_api_key_protects_everything_but_health_and_metrics(weights, tmp_path):
    settings = ServeSettings(
        weights=weights, backend="torch", api_key="s3cret", cache_dir=tmp_path, max_batch_size=1, warmup=False
    )
    with live_server(settings) as (url, _):
        assert httpx.get(f"{url}/healthz").status_code == 200
        metrics = httpx.get(f"{url}/metrics")  # Prometheus' pod annotations cannot send a token
        assert metrics.status_code == 200 and "maskformer_queue_depth" in metrics.text
        for path in ["/v1/model", "/docs"]:
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        good = {"Authorization": "Bearer s3cret"}
        for path in ["/segment", "/segment/batch"]:
            r = httpx.post(f"{url}{path}", files={"image": ("x.png", png())}, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            assert httpx.post(f"{url}{path}", files={"image": ("x.png", png())}).status_code == 401
            assert httpx.post(f"{url}{path}", files={"image": ("x.png", png())}, headers=good).status_code == 200
        assert httpx.get(f"{url}/v1/model", headers=good).status_code == 200


def test_not_ready_while_the_backend_loads(weights, tmp_path, monkeypatch):
    loaded = threading.Event()

    def slow_create_backend(*args, **kwargs):
        loaded.wait(60)  # the test releases it
        return create_backend(*args, **kwargs)

    monkeypatch.setattr("service.pipeline.create_backend", slow_create_backend)
    settings = ServeSettings(weights=weights, backend="torch", cache_dir=tmp_path, max_batch_size=2)
    with live_server(settings, wait_for="/healthz") as (url, _):
        try:
            assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
            r = httpx.get(f"{url}/readyz")
            assert r.status_code == 503 and r.json() == {"status": "not ready", "reason": "loading"}
            r = httpx.post(f"{url}/segment", files={"image": ("x.png", png())})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert r.headers["Retry-After"] == "1"
        finally:
            loaded.set()
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
        assert httpx.get(f"{url}/readyz").json()["warm_batch_sizes"] == [1, 2]
        assert httpx.post(f"{url}/segment", files={"image": ("x.png", png())}).status_code == 200


def test_onnxruntime_backend_exports_once_and_agrees_with_torch(weights, tmp_path):
    settings = ServeSettings(weights=weights, backend="onnxruntime", cache_dir=tmp_path, max_batch_size=2)
    with live_server(settings) as (url, _):
        r = httpx.post(f"{url}/segment?task=semantic", files={"image": ("x.png", png())})
        assert httpx.get(f"{url}/v1/model").json()["backend"] == "onnxruntime"
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    with live_server(settings.model_copy(update={"backend": "torch"})) as (url, _):
        t = httpx.post(f"{url}/segment?task=semantic", files={"image": ("x.png", png())})
    label_map = {}
    for name, resp in (("ort", r), ("torch", t)):
        lm = np.full((120, 160), -1)
        for s in resp.json()["segments"]:
            lm[decode_rle(s) == 1] = s["label_id"]
        label_map[name] = lm
    assert (label_map["ort"] == label_map["torch"]).mean() > 0.999


def test_a_source_tree_never_pip_installed_reports_an_unknown_version(monkeypatch):
    """GET /v1/model and the OpenAPI page name the package's version; run from PYTHONPATH there is none,
    which must not stop the server (the lent GPU machine runs the checkout that way)."""
    from importlib import metadata

    from service.app import package_version

    assert package_version() == metadata.version("maskformer-serving")

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert package_version() == "0+unknown"
