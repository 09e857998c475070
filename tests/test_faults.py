"""Faults the service must survive: a backend that fails one batch or hangs, clients that vanish (queued or
mid-upload), batch requests refused part-way, SIGTERM under load, and a cached ONNX file that is corrupt or
belongs to another model.

tests/test_serve_api.py covers the single-request versions (504, 500 then 200, one abandoned request);
these put several requests in flight at once.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from export.onnx import export_onnx
from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from model.postprocess import postprocess
from service.backends.ort_backend import cached_onnx
from service.settings import ServeSettings
from tests.conftest import tiny_config
from tests.images import encode, rgb
from tests.live_server import counter, live_server, metric
from tests.test_serve_process import start, wait_ready

NAMES, THINGS = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
PNG = encode(rgb(60, 80), "PNG")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(build_model(tiny_config(128), ModelInfo("tiny", NAMES, THINGS)), path)
    return path


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    settings = ServeSettings(
        weights=weights,
        backend="torch",
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_batch_size=4,
        max_queue_delay_ms=50,
        request_timeout_s=20,
        warmup=False,
    )
    with live_server(settings) as (url, app):
        yield url, app


async def post_many(url: str, n: int, timeout: float = 60) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        calls = (client.post(f"{url}/segment", files={"image": ("x.png", PNG)}) for _ in range(n))
        return await asyncio.gather(*calls, return_exceptions=True)


def swap_infer(app, infer):
    backend = app.state.pipeline.backend
    original = backend.infer
    backend.infer = lambda images: infer(original, images)
    return lambda: setattr(backend, "infer", original)


def statuses(responses) -> list[int | str]:
    return [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in responses]


def test_a_failing_batch_fails_only_its_own_requests(server):
    url, app = server
    calls: list[int] = []

    def fail_first(infer, images):
        calls.append(len(images))
        if len(calls) == 1:
            time.sleep(0.3)  # the other requests queue up behind this batch meanwhile
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return infer(images)

    restore = swap_infer(app, fail_first)
    try:
        got = statuses(asyncio.run(post_many(url, 8)))
    finally:
        restore()
    failed = calls[0]
    assert sorted(got) == sorted([500] * failed + [200] * (8 - failed)), (got, calls)
    assert len(calls) > 1 and httpx.get(f"{url}/readyz").status_code == 200


def test_a_hung_backend_gets_504s_then_recovers(server):
    url, app = server
    settings = app.state.pipeline.settings
    release = threading.Event()

    def hang(infer, images):
        release.wait(30)
        return infer(images)

    restore = swap_infer(app, hang)
    settings.request_timeout_s = 1.0
    try:
        got = statuses(asyncio.run(post_many(url, 6)))
    finally:
        settings.request_timeout_s = 20
        release.set()
        restore()
    assert got == [504] * 6
    assert statuses(asyncio.run(post_many(url, 4))) == [200] * 4  # the worker is free again
    assert metric(url, "maskformer_queue_depth") == 0


def test_abandoned_requests_leave_nothing_queued(server, caplog):
    url, app = server
    batcher = app.state.pipeline.batcher
    ran: list[int] = []

    def slow(infer, images):
        ran.append(len(images))
        time.sleep(0.5)
        return infer(images)

    restore = swap_infer(app, slow)
    try:
        for _ in range(3):  # rounds, so anything kept per request would add up
            got = statuses(asyncio.run(post_many(url, 24, timeout=0.2)))
            # clients give up waiting; on a loaded machine some give up while still connecting or sending
            assert "ReadTimeout" in got and set(got) <= {"ReadTimeout", "ConnectTimeout", "WriteTimeout"}, got
            time.sleep(1.0)  # the batch that was running finishes; the rest were never run
    finally:
        restore()
    assert sum(ran) <= 3 * 4  # at most the batch already running when its clients left, per round
    assert batcher.depth() == 0 and metric(url, "maskformer_queue_depth") == 0
    assert statuses(asyncio.run(post_many(url, 2))) == [200, 200]
    assert len(batcher.queue) == 0 and batcher.running == 0
    gc.collect()  # asyncio reports an unread exception when its future is collected
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


def post_batch(url: str, images: list[bytes]) -> httpx.Response:
    return httpx.post(f"{url}/segment/batch", files=[("image", (f"{i}.png", x)) for i, x in enumerate(images)])


def test_a_batch_request_with_a_bad_image_queues_none_of_its_images(server):
    url, app = server
    ran: list[int] = []
    restore = swap_infer(app, lambda infer, images: ran.append(len(images)) or infer(images))
    try:
        r = post_batch(url, [PNG, PNG, b"not an image", PNG])
        time.sleep(0.5)  # past the batcher's 50 ms delay: anything queued would have run by now
    finally:
        restore()
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    assert ran == [] and metric(url, "maskformer_queue_depth") == 0


def test_a_batch_request_refused_part_way_takes_its_queued_images_back(server):
    url, app = server
    batcher, ran = app.state.pipeline.batcher, []

    def slow(infer, images):
        ran.append(len(images))
        time.sleep(0.5)
        return infer(images)

    restore, old = swap_infer(app, slow), batcher.max_queue_size
    batcher.max_queue_size = 2
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post_batch, url, [PNG])
            deadline = time.monotonic() + 30
            while not ran and time.monotonic() < deadline:  # its forward pass holds the backend
                time.sleep(0.01)
            r = post_batch(url, [PNG] * 8)  # two images queue behind it, the third is refused
            assert first.result().status_code == 200
        time.sleep(1.0)  # the queued two would have run by now
    finally:
        batcher.max_queue_size = old
        restore()
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert ran == [1] and batcher.depth() == 0  # only the first request's forward pass ran
    assert post_batch(url, [PNG] * 2).status_code == 200


def test_more_images_than_the_limit_get_422_however_many(server):
    url, app = server
    limit = app.state.pipeline.settings.max_batch_images
    for n in (limit + 1, limit + 2):  # limit + 2 is past the form parser's own file limit
        r = post_batch(url, [PNG] * n)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", (n, r.text)
        assert f"exceed the limit of {limit}" in r.json()["error"]["message"]


def test_a_client_gone_mid_upload_counts_as_499_not_500(server, caplog):
    url, _ = server
    sample = 'maskformer_requests_total{{endpoint="/segment",status="{}"}}'
    before = {code: counter(url, sample.format(code)) for code in (499, 500)}
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head + PNG[:1000])  # a tenth of what it announced
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while counter(url, sample.format(499)) == before[499] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counter(url, sample.format(499)) == before[499] + 1
    assert counter(url, sample.format(500)) == before[500]
    assert not [r for r in caplog.records if r.levelno >= 40 and "ClientDisconnect" in str(r.exc_info)]


def test_sigterm_under_load_answers_every_accepted_request(weights, tmp_path):
    """12 clients post in a loop through SIGTERM: every request is answered 200 until intake stops.

    When the listening socket closes, a client is refused, or (a connection the kernel had completed but the
    server not yet accepted) reset; either ends it. A reset before intake stops would be a dropped request.
    """
    grace = 1.0
    args = ["--weights", str(weights), "--backend", "torch", "--max-queue-delay-ms", "20", "--drain-grace-s", "1"]
    proc, url, log = start(args, tmp_path)
    results: list[tuple[float, int | str]] = []  # (monotonic time, status or error)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    status: int | str = c.post(f"{url}/segment", files={"image": ("x.png", PNG)}).status_code
                except httpx.ConnectError:
                    status = "refused"
                except httpx.HTTPError as err:
                    status = type(err).__name__
                results.append((time.monotonic(), status))
                if status != 200:
                    return

    try:
        wait_ready(proc, url)
        with ThreadPoolExecutor(12) as pool:
            for _ in range(12):
                pool.submit(client)
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            intake_stops = time.monotonic() + grace
            time.sleep(0.3)
            ready = httpx.get(f"{url}/readyz", timeout=5)  # readiness is 503 while requests are still served
            time.sleep(3)  # past the grace: intake stops under the clients
            stop.set()
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    statuses = [r for _, r in results]
    ends = [(t, r) for t, r in results if r != 200]
    assert statuses.count(200) > 12 and len(ends) == 12, statuses  # every client ran until intake stopped
    assert {r for _, r in ends} <= {"refused", "ReadError", "RemoteProtocolError"}, statuses
    assert all(t >= intake_stops for t, r in ends if r != "refused"), (intake_stops, ends)
    assert (ready.status_code, ready.json()["reason"]) == (503, "draining")
    assert "server" not in ready.headers  # `serve` does not advertise uvicorn
    log.seek(0)
    text = log.read()
    # Readiness turns 503 in the signal handler, before uvicorn starts shutting down.
    assert text.index("draining (readiness is now 503)") < text.index("Shutting down")


@pytest.fixture(scope="module")
def other_model_onnx(tmp_path_factory):
    """A valid ONNX export of a different model (3 classes instead of 5)."""
    cfg = tiny_config(128).__class__(**{**tiny_config(128).__dict__, "num_classes": 3})
    path = tmp_path_factory.mktemp("onnx") / "other.onnx"
    export_onnx(build_model(cfg, ModelInfo("other", NAMES[:3], THINGS[:3])), path, (128, 128), max_batch=4)
    return path


@pytest.fixture(scope="module")
def exported_cache(weights, tmp_path_factory):
    """A cache directory holding the checkpoint's ONNX export, as `serve` leaves it after a first start on a
    CPU (the folded mask head)."""
    cache = tmp_path_factory.mktemp("cache")
    cached_onnx(weights, cache, (128, 128), fold_mask_conv=True)
    return cache


@pytest.mark.parametrize("case", ["corrupt", "other-model"])
def test_a_bad_cached_onnx_stops_start_up_with_its_reason(weights, tmp_path, exported_cache, other_model_onnx, case):
    shutil.copytree(exported_cache, tmp_path / "cache")  # where `start` points MASKFORMER_CACHE_DIR
    [cached] = (tmp_path / "cache").glob("*.onnx")
    cached.write_bytes(b"\x08\x07garbage" * 100 if case == "corrupt" else other_model_onnx.read_bytes())
    proc, _, log = start(["--weights", str(weights), "--backend", "onnxruntime"], tmp_path)
    assert proc.wait(timeout=90) != 0  # exits, rather than serving or hanging
    log.seek(0)
    text = log.read()
    assert "cannot serve" in text and cached.name in text and "delete it" in text, text[-3000:]
    assert "Traceback" not in text.split("cannot serve")[1]  # the reason is the last word, not a stack


def test_one_batch_is_post_processed_while_the_next_runs(server, monkeypatch):
    url, app = server
    in_post, second_forward = threading.Event(), threading.Event()
    overlapped: list[bool] = []
    threads: set[str] = set()

    def held_post(*args, **kwargs):  # the first image's post-processing waits for the next forward pass
        threads.add(threading.current_thread().name)
        if not in_post.is_set():
            in_post.set()
            overlapped.append(second_forward.wait(20))
        return postprocess(*args, **kwargs)

    def record(infer, images):
        if in_post.is_set():
            second_forward.set()
        return infer(images)

    monkeypatch.setattr("service.pipeline.postprocess", held_post)
    image = encode(rgb(), "PNG")
    post = lambda: httpx.post(f"{url}/segment", files={"image": ("x.png", image)}, timeout=60)  # noqa: E731
    restore = swap_infer(app, record)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post)
            assert in_post.wait(30)
            second = pool.submit(post)
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        restore()
    assert overlapped == [True]  # the second forward pass ran while the first batch was being post-processed
    assert threads and all(name.startswith("finish") for name in threads)
