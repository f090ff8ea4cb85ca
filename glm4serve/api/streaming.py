"""Server-sent events: `data: {json}\\n\\n` events, `: ping` keep-alive comments, `data: [DONE]`.

Keep-alive must be an SSE comment: the OpenAI SDK json-parses every event that has data.
An error after the stream started cannot change the status code any more, so it goes out as
`data: {"error": {...}}` followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from glm4serve.engine.types import ConstraintError, EngineError

from .errors import APIError, invalid_request, server_error
from .settings import ServerSettings

log = logging.getLogger("glm4serve.api")

DONE = b"data: [DONE]\n\n"


def sse_data(obj: dict) -> bytes:
    # json.dumps escapes newlines, so one event is always one `data:` line.
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def typed_event(body: dict) -> bytes:
    """An event named by its body's `type` (the Responses and Anthropic streams'): `event: {type}` then its data."""
    return b"event: " + body["type"].encode() + b"\n" + sse_data(body)


def sse_error(error: APIError) -> bytes:
    return sse_data(error.body())


@dataclass(frozen=True)
class StreamEnd:
    """How a stream reports a failure midway, and what ends it: chat and completions send the
    error envelope and `[DONE]`; the Responses API an `error` event and `response.failed`, no `[DONE]`."""

    error_event: Callable[[APIError], bytes] = sse_error
    done: bytes | None = DONE


async def keep_alive(events: AsyncIterator[bytes], seconds: float,
                     beat: Callable[[], bytes | None]) -> AsyncIterator[bytes]:
    """`events`, and beat() (unless None: not yet) after each `seconds` in which they brought none (0: never).
    For the APIs whose clients time out a stream that brings no event, SSE comments being none: Codex's idle
    timeout on the Responses API (while a prefill runs, or a call is held until whole); Anthropic's streams
    bring `ping` events so. The events come through a queue from a task of their own, which a timer shares; a
    beat is made only when the queue is empty, so after every event made before it (their sequence numbers)."""
    if not seconds:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                yield event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for event in events:
                queue.put_nowait(event)
        except BaseException as e:  # the consumer raises it (a cancel of the pump's own: nobody reads it)
            queue.put_nowait(e)
            raise
        finally:
            queue.put_nowait(_END)

    task = asyncio.ensure_future(pump())
    timer = None
    try:
        while True:
            timer = asyncio.get_running_loop().call_later(seconds, queue.put_nowait, _BEAT)
            item = await queue.get()
            timer.cancel()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if item is not _BEAT:
                yield item
            elif queue.empty() and (event := beat()) is not None:
                yield event
    finally:
        if timer is not None:
            timer.cancel()
        task.cancel()  # the client went: the wait for the engine stops, and the stream's close aborts it
        with anyio.CancelScope(shield=True):  # the close runs whole, whatever cancels this
            await asyncio.gather(task, return_exceptions=True)


_BEAT, _END = object(), object()  # keep_alive's queue: no event for a while; the end of the events


async def with_error_events(events: AsyncIterator[bytes], end: StreamEnd) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield end.error_event(e)
        except ConstraintError as e:
            yield end.error_event(invalid_request(f"the reply cannot go on under its constraint: {e}", None))
        except EngineError as e:
            yield end.error_event(server_error(f"the engine failed this request: {e}"))
        except Exception:
            log.exception("stream failed")
            yield end.error_event(server_error())
    if end.done is not None:
        yield end.done


def sse_response(events: AsyncIterator[bytes], settings: ServerSettings,
                 end: StreamEnd = StreamEnd()) -> EventSourceResponse:
    """Stream `events` (already-encoded SSE bytes), then [DONE] (as `end` says). Client disconnects
    cancel the generator, whose cleanup aborts the request in the engine. On shutdown (SIGTERM) a
    stream gets `graceful_shutdown_seconds` to finish before it is cut."""
    return EventSourceResponse(
        with_error_events(events, end),
        ping=settings.sse_ping_seconds,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        shutdown_grace_period=settings.graceful_shutdown_seconds,
    )
