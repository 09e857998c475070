"""`maskformer serve` as a real process: drain on SIGTERM with requests in flight, and start-up failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from tests.conftest import tiny_config
from tests.images import encode, rgb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], tmp_path) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "MASKFORMER_CACHE_DIR": str(tmp_path / "cache"), "MASKFORMER_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("not ready")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    names, things = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
    save_model(build_model(tiny_config(128), ModelInfo("tiny", names, things)), path)
    return path


def test_sigterm_drains_queued_and_in_flight_requests(weights, tmp_path):
    # A long queue delay keeps the requests waiting in the batcher when SIGTERM arrives.
    args = ["--weights", str(weights), "--backend", "torch", "--max-batch-size", "8", "--max-queue-delay-ms", "2000"]
    args += ["--drain-grace-s", "1"]
    proc, url, log = start(args, tmp_path)
    try:
        wait_ready(proc, url)
        assert "\nmaskformer_ready 1.0\n" in httpx.get(f"{url}/metrics", timeout=2).text
        image = encode(rgb(80, 100), "PNG")
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/segment", files={"image": ("x.png", image)}, timeout=30)
                for _ in range(4)
            ]
            time.sleep(0.7)  # all four are queued now
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(f"{url}/readyz", timeout=2)  # within the grace: still listening, not ready
            assert (ready.status_code, ready.json()["reason"]) == (503, "draining")
            assert ready.headers["connection"] == "close"
            assert "\nmaskformer_ready 0.0\n" in httpx.get(f"{url}/metrics", timeout=2).text  # the gauge too
            time.sleep(1.2)
            with pytest.raises(httpx.TransportError):  # past the grace, intake has stopped
                httpx.get(f"{url}/healthz", timeout=2)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.json()["width"] == 100 for r in responses)
        # After draining, uvicorn re-raises the signal, so the exit status is the conventional 128+15.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    assert "draining (readiness is now 503)" in log.read()


def test_a_checkpoint_that_cannot_load_exits_with_its_reason(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    proc, _, log = start(["--weights", str(bad)], tmp_path)
    assert proc.wait(timeout=60) != 0
    log.seek(0)
    assert "only .safetensors checkpoints are loaded (nothing is unpickled)" in log.read()


def test_a_damaged_default_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch):
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(Path(__file__).resolve().parents[1] / "weights", weights)
    with (weights / "shapes-r10.safetensors").open("r+b") as f:
        f.seek(4096)
        f.write(b"\x7c" * 8)
    monkeypatch.setenv("MASKFORMER_WEIGHTS_DIR", str(weights))  # start() passes the environment on
    proc, _, log = start([], tmp_path)
    assert proc.wait(timeout=60) == 2
    log.seek(0)
    text = log.read()
    assert "error: " in text and "but the registry says" in text and "Traceback" not in text, text


def test_serve_rejects_unknown_settings(tmp_path):
    proc, _, log = start(["--max-batch-size", "0"], tmp_path)
    assert proc.wait(timeout=60) != 0
    log.seek(0)
    assert "max_batch_size" in log.read()


def test_sigterm_during_the_export_ends_the_process_where_sigterm_is_ignored_by_default(tmp_path):
    """As PID 1 in a container, where the kernel ignores a signal's default action: uvicorn's re-raised
    SIGTERM then does nothing, and the process would wait for the loader thread's export. A process that
    starts with SIGTERM ignored behaves the same (uvicorn restores that on its way out)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MASKFORMER_CACHE_DIR": str(cache), "MASKFORMER_THREADS": "1"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port()), "--drain-grace-s", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
        )
    try:
        deadline = time.monotonic() + 120
        while "exporting" not in log_path.read_text():  # the shipped model's first-start ONNX export
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "exiting without waiting for the export or build" in log_path.read_text()
    assert not list(cache.glob("*.onnx")), "the export was waited for"
