"""Graceful shutdown: uvicorn's Server with a drain in front of its own shutdown.

On the first SIGTERM (or SIGINT) the gate starts refusing new requests with 503 and /health
turns 503, while the listening socket stays open (so clients get an answer, not a refused
connection) and requests in flight run on. Once none is left, or `grace` seconds have passed,
uvicorn shuts down as usual. At the grace's end the engine is stopped first, so that what still
runs ends as a failed request does (an error event and [DONE], or a 500), not as a cut connection;
anything left after CUT_AFTER_SECONDS is cut. A second signal skips the rest of the drain
(uvicorn's own handling).

An engine loop that dies takes the server down with it (exit status 1): a server whose every
request would fail is one for its supervisor (compose's restart, Kubernetes) to restart.

The first signal is deliberately not recorded as uvicorn's "captured" signal: uvicorn re-raises
those after shutdown, which would end the process by the signal instead of exiting 0.
"""

from __future__ import annotations

import logging
import time

import uvicorn

from .gate import Gate

log = logging.getLogger("glm4serve")

CUT_AFTER_SECONDS = 2.0  # uvicorn's own graceful timeout, once the drain is over


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gate: Gate, grace: float, engine=None):
        super().__init__(config)
        self.gate = gate
        self.grace = grace
        self.engine = engine  # the AsyncEngine (shutdown, died), if this process runs one
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is not None:  # second signal: stop waiting
            super().handle_exit(sig, frame)
            return
        self.drain_deadline = time.monotonic() + self.grace
        self.gate.draining = True
        log.warning("shutting down: refusing new requests, %d in flight get up to %gs to finish",
                    self.gate.num_in_flight, self.grace)

    async def on_tick(self, counter: int) -> bool:
        # Runs every 0.1 s on the event loop, the thread the gate lives on.
        if self.engine is not None and self.engine.died and not self.should_exit:
            log.error("the engine loop died: the server exits (status 1) for its supervisor to restart it")
            self.gate.draining = True
            self.exit_code = 1
            self.should_exit = True
        if self.drain_deadline is not None and not self.should_exit:
            if self.gate.num_in_flight == 0:
                log.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("grace period over: ending %d request(s) still in flight", self.gate.num_in_flight)
                if self.engine is not None:
                    self.engine.shutdown(timeout=0, reason="the server shut down before this request finished")
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(app, settings, log_level: str = "info") -> int:
    """Serve `app` (from create_app) until a signal and its drain are through -> the exit status."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=CUT_AFTER_SECONDS)
    server = DrainingServer(config, app.state.gate, settings.graceful_shutdown_seconds, app.state.serving.engine)
    server.run()
    return server.exit_code
