"""Background responses (`background: true` on POST /v1/responses), as OpenAI's API and vLLM run them.

The request is checked as any other (a 4xx comes back at once), then its reply runs as a task of the server's
own, not of the HTTP request: the POST answers with the response `queued` (or, streamed, follows its events),
and a client that goes away leaves it running. GET /v1/responses/{id} shows it `in_progress` with its output so
far, and once it ends, what it came to (stored as every response is, failed and cancelled ones too). Its stream
is kept, so GET ...?stream=true&starting_after=N follows it from any event on: while it runs, and after, for
the latest finished ones that fit FINISHED_EVENTS_BYTES. POST .../cancel stops it (`cancelled`, the engine
request aborted).

A running one counts as a generation request at the gate (capacity, and the drain a shutdown waits for), as its
POST would have while it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .gate import Gate

if TYPE_CHECKING:
    from .response_store import ResponseStore
    from .responses import ResponseBuilder

log = logging.getLogger("glm4serve.api")

FINISHED_EVENTS_BYTES = 32 << 20  # the streams of finished background responses kept for replay, newest first


@dataclass
class BackgroundJob:
    builder: ResponseBuilder
    events: list[bytes] = field(default_factory=list)  # the stream so far; event i has sequence_number i
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set, and replaced, on each new event and at the end
    task: asyncio.Task | None = None
    done: bool = False
    final: dict | None = None  # the response it came to, once done

    @property
    def id(self) -> str:
        return self.builder.fixed["id"]

    def notify(self) -> None:
        """Wake the followers (no await: the job's end must not be cut by a cancel in mid-step)."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def size(self) -> int:
        return sum(map(len, self.events))

    def snapshot(self) -> dict:
        """The response as GET shows it: what it came to, else in progress with its output so far."""
        if self.final is not None:
            return self.final
        return self.builder.response("in_progress" if self.events else "queued")


class BackgroundResponses:
    def __init__(self, gate: Gate, store: ResponseStore):
        self.gate, self.store = gate, store
        self._jobs: OrderedDict[str, BackgroundJob] = OrderedDict()  # running ones, then finished ones kept
        self._finished_bytes = 0

    def start(self, builder: ResponseBuilder, events: Callable[[], AsyncIterator[bytes]]) -> BackgroundJob:
        """Run the reply whose stream `events()` makes (its failures already events, streaming.py)."""
        job = BackgroundJob(builder)
        self._jobs[job.id] = job
        self.gate.num_generating += 1
        self.gate.num_in_flight += 1
        job.task = asyncio.create_task(self._run(job, events), name=f"glm4serve-background-{job.id}")
        return job

    def get(self, response_id: str) -> BackgroundJob | None:
        return self._jobs.get(response_id)

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
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job.final

    async def drop(self, job: BackgroundJob) -> None:
        """Forget it (DELETE): stopped first if it runs."""
        await self.cancel(job)
        if self._jobs.pop(job.id, None) is not None:
            self._finished_bytes -= job.size

    async def _run(self, job: BackgroundJob, events: Callable[[], AsyncIterator[bytes]]) -> None:
        builder = job.builder
        try:
            async with contextlib.aclosing(events()) as stream:
                async for event in stream:
                    job.events.append(event)
                    job.notify()
            job.final = builder.final
        except asyncio.CancelledError:  # cancelled: the stream's close aborted the engine request
            builder.close("incomplete")
            job.final = builder.response("cancelled")
        except Exception:  # the stream turns failures into events; this is a bug, but the job must end
            log.exception("background response %s failed", job.id)
        finally:
            if job.final is None or job.final["status"] in ("cancelled", "failed"):  # a finished one is stored
                job.final = job.final or builder.response("failed")
                self.store.put(job.final, builder.input_items)
            job.done = True
            job.notify()
            self.gate.num_generating -= 1
            self.gate.num_in_flight -= 1
            self._finished(job)

    def _finished(self, job: BackgroundJob) -> None:
        """Keep the finished streams that fit, newest first: the oldest go."""
        self._finished_bytes += job.size
        for old in [j for j in self._jobs.values() if j.done]:
            if self._finished_bytes <= FINISHED_EVENTS_BYTES:
                break
            del self._jobs[old.id]
            self._finished_bytes -= old.size
