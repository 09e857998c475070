"""`maskformer serve`: uvicorn around the app, with readiness that drops the moment SIGTERM arrives.

On SIGTERM or SIGINT, /readyz turns 503 at once (so load balancers stop sending), uvicorn stops accepting
connections, requests already received (queued or in a batch) are answered, and then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import uvicorn

from service.app import create_app
from service.settings import ServeSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        status = getattr(self.config.app, "state", None)
        if status is not None:
            status.status["draining"] = True
        log.info("signal %d: draining (readiness is now 503)", sig)
        super().handle_exit(sig, frame)


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
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config)
    server.run()
    if app.state.status["load_error"]:
        raise SystemExit(f"the backend failed to load: {app.state.status['load_error']}")
