"""A real uvicorn server on a loopback port, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.app import create_app
from service.settings import ServeSettings


@contextmanager
def live_server(
    settings: ServeSettings, ready_timeout: float = 180.0, wait_for: str = "/readyz"
) -> Iterator[tuple[str, object]]:
    """Yields (base URL, app) once `wait_for` answers 200: /readyz (loaded and warm) or /healthz (listening)."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}{wait_for}", timeout=5).status_code == 200, ready_timeout, app)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until(condition: Callable[[], bool], timeout: float = 120.0, app=None) -> None:
    """Poll `condition` (connection errors count as not yet); fail early if the app's backend failed to load."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        if app is not None and app.state.status["load_error"]:
            raise RuntimeError(app.state.status["load_error"])
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for the server")
        time.sleep(0.05)


def metric(url: str, sample: str, headers: dict[str, str] | None = None) -> float:
    """One sample of /metrics, named as exposed: 'maskformer_batch_size_sum' or 'name{label="v",...}'."""
    for line in httpx.get(f"{url}/metrics", headers=headers).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise KeyError(sample)


def counter(url: str, sample: str) -> float:
    """A labelled counter's sample, 0 until its first increment (prometheus exposes none before)."""
    try:
        return metric(url, sample)
    except KeyError:
        return 0.0
