"""What a request meets before any route: the body size limit (413), admission of generation
requests (429 when the queue is full, 503 while the server drains for shutdown), and the count
of requests in flight that a graceful shutdown waits for.

A pure ASGI middleware rather than a FastAPI dependency: it answers before the body is read
(a client over the limit is refused at once) and it sees a streamed response end, which is
when its request stops counting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("glm4serve.api")

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations",
                              "/v1/messages"})
# Probes and scrapes are answered whatever the load; /health reports a drain itself (503).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
RELEASE = "gate_release"  # request.state's: the request's release from the count of generation requests
RETRY_AFTER_FULL = "1"  # seconds: a batch slot frees up within a few decode steps' worth of work
RETRY_AFTER_DRAINING = "5"  # seconds: long enough for a load balancer to stop sending here


@dataclass
class Gate:
    """Admission state of one app. Touched only from the event loop thread: no lock."""

    capacity: int  # generation requests admitted at once (running + waiting)
    max_body_bytes: int
    num_generating: int = 0  # admitted generation requests not yet answered
    num_in_flight: int = 0  # every admitted request except the open paths; a drain waits for 0
    draining: bool = False  # set on SIGTERM: new requests get 503

    @classmethod
    def from_settings(cls, settings) -> "Gate":
        return cls(capacity=settings.max_num_seqs + settings.max_waiting_requests,
                   max_body_bytes=settings.max_request_body_bytes)


class GateMiddleware:
    def __init__(self, app: ASGIApp, gate: Gate, metrics: Metrics):
        self.app = app
        self.gate = gate
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        gate = self.gate
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal.response(scope["path"])(scope, receive, send)
            return
        generating = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        gate.num_in_flight += 1
        gate.num_generating += generating

        def release() -> None:
            """The request no longer counts as generating: what it started counts on its own (background.py)."""
            nonlocal generating
            gate.num_generating -= generating
            generating = False

        scope.setdefault("state", {})[RELEASE] = release
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            gate.num_in_flight -= 1
            release()

    def _refusal(self, scope: Scope) -> APIError | None:
        gate = self.gate
        if gate.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            return APIError(503, "The server is shutting down; retry on another replica or later.",
                            "service_unavailable_error", headers={"Retry-After": RETRY_AFTER_DRAINING})
        if scope["method"] == "POST" and scope["path"] in GENERATION_PATHS and gate.num_generating >= gate.capacity:
            self.metrics.rejected.labels(reason="queue_full").inc()
            return APIError(429, f"The server is at capacity ({gate.capacity} requests running or queued); "
                            f"retry shortly.", "rate_limit_error", code="queue_full",
                            headers={"Retry-After": RETRY_AFTER_FULL})
        length = _content_length(scope)
        if length is not None and length > gate.max_body_bytes:
            self.metrics.rejected.labels(reason="body_too_large").inc()
            return _too_large(gate.max_body_bytes)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a body without (or lying about) Content-Length at the limit."""
        limit, seen = self.gate.max_body_bytes, 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    self.metrics.rejected.labels(reason="body_too_large").inc()
                    # FastAPI re-raises an HTTPException from reading the body; the app's handler
                    # turns it into the OpenAI error envelope.
                    raise HTTPException(413, _too_large(limit).message)
            return message

        return receive_limited


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes.",
                    "invalid_request_error")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
