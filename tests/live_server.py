"""A real uvicorn server on a loopback port, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.app import create_app
from service.settings import ServeSettings


@contextmanager
def live_server(settings: ServeSettings, ready_timeout: float = 180.0) -> Iterator[tuple[str, object]]:
    """Yields (base URL, app) once /readyz answers 200."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if app.state.status["load_error"]:
                raise RuntimeError(app.state.status["load_error"])
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready")
            time.sleep(0.1)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def metric(url: str, sample: str, headers: dict[str, str] | None = None) -> float:
    """One sample of /metrics, named as exposed: 'maskformer_batch_size_sum' or 'name{label="v",...}'."""
    for line in httpx.get(f"{url}/metrics", headers=headers).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise KeyError(sample)
