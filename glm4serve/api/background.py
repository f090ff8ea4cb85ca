"""Background responses (`background: true` on POST /v1/responses), as OpenAI's API and vLLM run them.

The request is checked as any other (a 4xx comes back at once), then its reply runs as a task of the server's
own, not of the HTTP request: the POST answers with the response `queued` (or, streamed, follows its events),
and a client that goes away leaves it running. While it runs, GET /v1/responses/{id} shows it `in_progress`
with its output so far; once it ends, it is stored as every response is (failed and cancelled ones too) and
served from the store. Its stream is kept, so GET ...?stream=true&starting_after=N follows it from any event on:
while it runs, and after, for the latest finished ones that fit FINISHED_EVENTS_BYTES. POST .../cancel stops it
(`cancelled`, the engine request aborted; its stream ends with the open item's .done events and a
`response.cancelled` event, the name of OpenAI's webhook for it).

A running one counts as a generation request at the gate (capacity, and the drain a shutdown waits for) in the
place of its POST, which stops counting as one when it hands the reply over (gate.py's release).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .errors import invalid_request
from .gate import Gate

if TYPE_CHECKING:
    from .response_store import ResponseStore
    from .responses import ResponseBuilder

log = logging.getLogger("glm4serve.api")

FINISHED_EVENTS_BYTES = 32 << 20  # the streams of finished background responses kept for replay, newest first


@dataclass
class BackgroundJob:
    id: str
    builder: ResponseBuilder | None  # while it runs; dropped at its end (its input is the store's to keep)
    events: list[bytes] = field(default_factory=list)  # the stream so far; event i has sequence_number i
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set, and replaced, on each new event and at the end
    task: asyncio.Task | None = None
    done: bool = False
    final: dict | None = None  # the response it came to, once done
    size: int = 0  # bytes held once done: its events and final response

    def add(self, data: bytes) -> None:
        """Events as SSE bytes (one chunk may hold several: a failure's `error` and `response.failed`)."""
        self.events += [part + b"\n\n" for part in data.split(b"\n\n") if part]
        self.notify()

    def notify(self) -> None:
        """Wake the followers (no await: the job's end must not be cut by a cancel in mid-step)."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def snapshot(self) -> dict:
        """The running response as GET shows it: in progress with its output so far."""
        return self.builder.response("in_progress" if self.events else "queued")


class BackgroundResponses:
    def __init__(self, gate: Gate, store: ResponseStore, ping_seconds: float = 0.0):
        """ping_seconds: a job's stream that brings no event for so long says response.in_progress again, as
        streaming.keep_alive keeps a stream alive (0: never)."""
        self.gate, self.store, self.ping_seconds = gate, store, ping_seconds
        self._jobs: OrderedDict[str, BackgroundJob] = OrderedDict()  # running ones, then finished ones kept
        self._finished_bytes = 0

    def start(self, builder: ResponseBuilder, events: Callable[[], AsyncIterator[bytes]],
              release_request: Callable[[], None] | None = None) -> BackgroundJob:
        """Run the reply whose stream `events()` makes (its failures already events, streaming.py). It counts at
        the gate from here on, in the place of the request that started it (release_request)."""
        job = BackgroundJob(builder.fixed["id"], builder)
        self._jobs[job.id] = job
        self.gate.num_generating += 1
        self.gate.num_in_flight += 1
        if release_request is not None:
            release_request()
        job.task = asyncio.create_task(self._run(job, events), name=f"glm4serve-background-{job.id}")
        job.task.add_done_callback(lambda _: self._end(job))  # whatever ended it, before it even began too
        return job

    def get(self, response_id: str) -> BackgroundJob | None:
        return self._jobs.get(response_id)

    def running(self, response_id: str) -> BackgroundJob | None:
        job = self._jobs.get(response_id)
        return job if job is not None and not job.done else None

    def check_not_running(self, response_id: str, param: str) -> None:
        """A 400 for a response still running, which cannot be continued from yet."""
        if self.running(response_id) is not None:
            raise invalid_request(f"Response with id {response_id!r} is still in progress: continue from it once "
                                  "it has completed.", param)

    async def follow(self, job: BackgroundJob, starting_after: int = -1) -> AsyncIterator[bytes]:
        """The job's events after sequence number `starting_after`, as they come, until it ends."""
        i = max(starting_after + 1, 0)
        while True:
            changed = job.changed
            while i < len(job.events):
                yield job.events[i]
                i += 1
            if job.done:
                return
            if changed is job.changed:  # nothing new while it yielded
                await changed.wait()

    async def cancel(self, job: BackgroundJob) -> dict:
        """Stop a running job: it ends `cancelled`, its output so far kept (not added to its conversation)."""
        if not job.done:
            job.task.cancel()
            await asyncio.wait([job.task])
            self._end(job)  # done already, unless its callback has yet to run
        return job.final

    async def drop(self, job: BackgroundJob) -> None:
        """Forget it (DELETE): stopped first if it runs."""
        await self.cancel(job)
        if self._jobs.pop(job.id, None) is not None:
            self._finished_bytes -= job.size

    async def _run(self, job: BackgroundJob, events: Callable[[], AsyncIterator[bytes]]) -> None:
        builder = job.builder
        stream = events()
        loop, timer = asyncio.get_running_loop(), None

        def rearm() -> None:  # the timer runs while this task waits for the engine: after every event made
            nonlocal timer
            if timer is not None:
                timer.cancel()
            if self.ping_seconds:
                timer = loop.call_later(self.ping_seconds, idle)

        def idle() -> None:
            job.add(builder.in_progress())
            rearm()

        try:
            rearm()
            async for data in stream:
                job.add(data)
                rearm()
            job.final = builder.final
        except asyncio.CancelledError:  # raised in the stream, whose close aborted the engine request
            for data in builder.close("incomplete"):
                job.add(data)
            job.final = builder.response("cancelled")
            job.add(builder.event("response.cancelled", response=job.final))
        finally:
            if timer is not None:
                timer.cancel()
            await stream.aclose()

    def _end(self, job: BackgroundJob) -> None:
        """Once, however it ended: stored (a completed one stored itself), and no longer counted at the gate."""
        if job.done:
            return
        builder = job.builder
        if job.final is None:  # cancelled before it began, or a bug (the stream turns failures into events)
            if not job.task.cancelled():
                log.error("background response %s ended without a response: %s", job.id, job.task.exception())
            job.final = builder.response("cancelled" if job.task.cancelled() else "failed")
        if job.final["status"] in ("cancelled", "failed"):
            self.store.put(job.final, builder.input_items)
        job.builder, job.done = None, True
        job.notify()
        self.gate.num_generating -= 1
        self.gate.num_in_flight -= 1
        job.size = sum(map(len, job.events)) + len(json.dumps(job.final))
        self._finished_bytes += job.size
        for old in [j for j in self._jobs.values() if j.done]:  # the oldest streams go first
            if self._finished_bytes <= FINISHED_EVENTS_BYTES:
                break
            del self._jobs[old.id]
            self._finished_bytes -= old.size
