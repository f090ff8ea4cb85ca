"""The engine loop on its own thread, with an asyncio face for the API.

The loop thread owns the LLMEngine: nothing else touches it. Other threads hand it commands (add,
abort, and calls such as loading a LoRA adapter, whose result comes back in a future) through a
queue guarded by a condition variable, which the loop also sleeps on when it has no work. Each
request's Outputs travel back to the event loop that asked for them, through
loop.call_soon_threadsafe into that request's asyncio.Queue. After a busy spell, once idle for a
second, the loop hands the C heap's free memory back to the OS (release_free_memory).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .client import SHUTDOWN_TIMEOUT_S
from .engine import LLMEngine
from .types import EngineError, EngineStats, GuidedSpec, Output, SamplingParams

log = logging.getLogger(__name__)

_END = object()  # queued after a request's last Output
SHUT_DOWN = "the engine was shut down"  # what requests in flight at shutdown() are told by default


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()
TRIM_AFTER_IDLE_S = 1.0  # a client's next request right after its last reply never waits on a trim


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS; False where there is no glibc.

    glibc keeps what a thread's arena freed for that thread's next allocations and returns only a
    free tail to the OS. After a busy spell (prefill activations, tokenizer and grammar threads)
    that is hundreds of MB held by an idle server: 525 MB of a 1.34 GB rise, on glm-4-9b-chat's
    shapes (2 layers, int8) after 5 minutes of mixed requests. malloc_trim(0) also releases the
    free pages inside each arena, not only at its end; it took 70 ms on that 4 GB process."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of Output, then _END; or one exception


class AsyncEngine:
    """The engine client the API uses (engine/client.py). Make one with AsyncEngine.start(build)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine  # owned by the loop thread
        self._cv = threading.Condition()
        # guarded by _cv:
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._stats = engine.stats()
        self._died: BaseException | None = None  # written under _cv by the loop thread
        self._stop_reason = SHUT_DOWN  # what requests in flight at shutdown() are told
        self._thread: threading.Thread | None = None

    # --- any thread ---------------------------------------------------------------------------

    @classmethod
    def start(cls, build: Callable[[], LLMEngine]) -> AsyncEngine:
        """Build the engine on the thread that will run its loop, start the loop, return once built
        (raising whatever build() raised).

        Why build there: OpenMP (libgomp, under torch) gives every thread that runs parallel ops its
        own team of workers. Two teams on a 2-core box is more threads than cores, and libgomp then
        stops spinning between parallel regions: every op pays a wake-up of its sleeping worker
        (measured: a 100K-element add 6 -> 40 us; a decode step +1.3 ms). Loading the model on the
        loop thread keeps torch's parallel work on one team."""
        built: list = []
        ready = threading.Event()

        def loop_thread() -> None:
            try:
                engine = cls(build())
                engine._thread = threading.current_thread()
                built.append(engine)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                built.append(e)
                return
            finally:
                ready.set()
            engine._run()

        threading.Thread(target=loop_thread, name="glm4serve-engine", daemon=True).start()
        ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        return built[0]

    def shutdown(self, timeout: float | None = SHUTDOWN_TIMEOUT_S, reason: str = SHUT_DOWN) -> None:
        """Stop the loop; requests still in flight end with EngineError(reason) (timeout 0: at once,
        without waiting for the loop's last step)."""
        with self._cv:
            if not self._stopping:
                self._stop_reason = reason
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._died is None and not self._stopping

    @property
    def died(self) -> bool:
        """The loop ended by an exception, not by shutdown()."""
        return self._died is not None

    def stats(self) -> EngineStats:
        with self._cv:
            snapshot = dataclasses.replace(self._stats)
        snapshot.alive = self.is_alive
        return snapshot

    def replica_stats(self) -> dict[str, EngineStats]:
        return {}  # one engine: its stats are stats()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError when the engine would refuse the request (reads only its fixed limits)."""
        self.engine.check_request(prompt_ids, params)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Takes effect before the next step: the request's blocks are freed, its stream ends with
        finish_reason 'abort'. With `index`, only that choice ends so, and its siblings go on. Unknown or
        finished requests are ignored."""
        with self._cv:
            self._commands.append(("abort", request_id, index))
            self._cv.notify()

    async def load_lora(self, name: str, path: str, replace: bool = False) -> None:
        """Between two steps, on the loop thread (its OpenMP team does the adapter's tensor work): the
        steps wait while the adapter loads."""
        await self._call(lambda: self.engine.load_lora(name, path, replace))

    async def unload_lora(self, name: str) -> None:
        await self._call(lambda: self.engine.unload_lora(name))

    async def _call(self, fn: Callable[[], object]):
        """fn() run by the loop thread between steps: its result, or what it raised."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._thread is None or self._died is not None or self._stopping:
                raise EngineError("the engine loop is not running")
            self._commands.append(("call", fn, future))
            self._cv.notify()
        return await asyncio.wrap_future(future)

    async def compile_guided(self, spec: GuidedSpec) -> None:
        """Compile (and cache) a structured-output grammar in a worker thread, so neither the
        event loop nor the engine loop waits on it. ValueError when it cannot be compiled."""
        await self.engine.grammars.compile_async(spec)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Output]:
        """Stream the request's Outputs. Raises ValueError for a request the engine refuses,
        EngineError when the engine fails it. Leaving early (break, aclose, cancellation) aborts it."""
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            # under the lock: a stream registered here is either served or failed by the loop's exit
            if self._thread is None or self._died is not None or self._stopping:
                raise EngineError("the engine loop is not running")
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r} is already in the engine")
            self._streams[request_id] = stream
            self._commands.append(("add", request_id, list(prompt_ids), params))
            self._cv.notify()
        ended = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
        finally:
            if not ended:  # the consumer left: stop spending compute on it
                with self._cv:
                    self._streams.pop(request_id, None)
                self.abort(request_id)

    # --- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        reason = None
        worked = False  # since the C heap was last trimmed
        try:
            while True:
                if worked:  # once per busy spell, when idle a while; outside the lock, so adds never wait
                    with self._cv:
                        idle = not self._cv.wait_for(self._has_input, timeout=TRIM_AFTER_IDLE_S)
                    if idle:
                        t0 = time.perf_counter()
                        release_free_memory()
                        log.debug("idle: returned free heap memory in %.1f ms", 1e3 * (time.perf_counter() - t0))
                        worked = False
                with self._cv:
                    self._cv.wait_for(self._has_input)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                if self.engine.has_work:
                    outputs = self.engine.step()
                    self._deliver(outputs, self.engine.pop_errors())
                    worked = True
                stats = self.engine.stats()
                with self._cv:
                    self._stats = stats
        except BaseException as e:
            log.exception("the engine loop died")
            with self._cv:
                self._died = e
            reason = f"the engine loop died: {e!r}"
        finally:
            with self._cv:
                streams, self._streams = self._streams, {}
                calls = [c[2] for c in self._commands if c[0] == "call"]
                reason = reason or self._stop_reason
            for stream in streams.values():
                self._put(stream, EngineError(reason))
            for future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineError(reason))
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001 - shutting down either way
                log.exception("closing the engine failed")

    def _has_input(self) -> bool:  # under _cv
        return bool(self._commands or self._stopping or self.engine.has_work)

    def _apply(self, command: tuple) -> None:
        if command[0] == "call":
            _, fn, future = command
            if not future.set_running_or_notify_cancel():  # its caller stopped waiting before it ran
                return
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller's to handle
                future.set_exception(e)
            return
        if command[0] == "abort":
            _, request_id, index = command
            outputs = self.engine.abort(request_id, index)
            self._deliver(outputs, [])
            return
        _, request_id, prompt_ids, params = command
        with self._cv:
            wanted = request_id in self._streams
        if not wanted:  # its consumer left before the loop saw it
            return
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except ValueError as e:
            self._end(request_id, e)
        except Exception as e:
            log.exception("adding request %s failed", request_id)
            self._end(request_id, EngineError(f"request {request_id} failed: {e!r}"))

    def _deliver(self, outputs: list[Output], errors: list[tuple[str, EngineError]]) -> None:
        for out in outputs:
            with self._cv:
                stream = self._streams.get(out.request_id)
            if stream is not None and not self._put(stream, out):
                self._drop(out.request_id)
        for request_id in dict.fromkeys(o.request_id for o in outputs if o.finish_reason is not None):
            if not self.engine.has_request(request_id):  # every choice is done
                self._end(request_id, _END)
        for request_id, error in errors:
            self._end(request_id, error)

    def _end(self, request_id: str, last) -> None:
        with self._cv:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._put(stream, last)

    def _drop(self, request_id: str) -> None:
        """Its event loop is gone: nobody can read it any more."""
        with self._cv:
            self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    @staticmethod
    def _put(stream: _Stream, item) -> bool:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed
            return False
