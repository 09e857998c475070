"""`maskformer serve`: uvicorn around the app, with readiness that drops the moment SIGTERM arrives.

On SIGTERM or SIGINT, /readyz turns 503 at once and every response says `Connection: close`; the server
keeps serving for `drain_grace_s` (load balancers see the 503 and stop sending, keep-alive clients
reconnect), then stops accepting connections, answers the requests already received (queued or in a
batch), and exits. A second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from types import FrameType

import uvicorn

from service.app import create_app
from service.settings import ServeSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace_s: float = 0.0) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.grace: threading.Timer | None = None
        self.signalled: int | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets)
        finally:
            # uvicorn re-raises the signal on its way out. Where that ends the process (SIGTERM's default
            # action) nothing here runs; where it does not (PID 1 in a container ignores it, SIGINT raises
            # KeyboardInterrupt), asyncio would wait for the loader thread's export or build to finish.
            status = getattr(getattr(self.config.app, "state", None), "status", {})
            if self.signalled is not None and status.get("loading"):
                log.warning("signal %d while loading: exiting without waiting for the export or build", self.signalled)
                logging.shutdown()
                os._exit(128 + self.signalled)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signalled = sig
        status = getattr(self.config.app, "state", None)
        if status is not None:
            status.status["draining"] = True
        if self.grace is None and self.grace_s > 0:
            log.info("signal %d: draining (readiness is now 503); intake stops in %g s", sig, self.grace_s)
            self.grace = threading.Timer(self.grace_s, super().handle_exit, (sig, frame))
            self.grace.daemon = True
            self.grace.start()
            return
        log.info("signal %d: draining (readiness is now 503)", sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting first...
        # ...then give connections that have no request under way (accepted just before, or between two
        # keep-alive requests) up to IDLE_WAIT_S to show one: uvicorn closes idle connections, and a request
        # already sent on one would be dropped. A loaded machine can take more than a moment to read it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_WAIT_S
        while loop.time() < deadline and any(_idle(c) for c in self.server_state.connections):
            await asyncio.sleep(0.02)
        await super().shutdown(sockets)


IDLE_WAIT_S = 1.0


def _idle(connection: object) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is None or bool(getattr(cycle, "response_complete", False))


def serve(settings: ServeSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the first-start export logs every graph pass
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def exit_on_load_error(err: BaseException) -> None:
        log.critical("cannot serve: %s", err)
        os.kill(os.getpid(), signal.SIGTERM)

    app = create_app(settings, on_load_error=exit_on_load_error)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,  # no "server: uvicorn" for fingerprinting
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config, settings.drain_grace_s)
    server.run()
    if app.state.status["load_error"]:
        raise SystemExit(f"the backend failed to load: {app.state.status['load_error']}")
