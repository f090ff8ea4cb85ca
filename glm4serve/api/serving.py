"""What the chat and completion routes share: the server context, request checks, a metered
engine stream that always aborts what it leaves unfinished, and disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from glm4serve.chat.template import TemplateError, render_prompt
from glm4serve.engine.client import EngineClient
from glm4serve.engine.types import ABORT, ERROR, STOP, ConstraintError, EngineError, Output, SamplingParams
from glm4serve.model.tokenizer import Tokenizer

from .errors import APIError, invalid_request, server_error
from .gate import RETRY_AFTER_DRAINING
from .json_checks import schema_problem
from .metrics import Metrics, RequestMetrics
from .background import BackgroundResponses
from .conversations import ConversationStore
from .response_store import ResponseStore
from .settings import ServerSettings
from .streaming import StreamEnd, sse_response

log = logging.getLogger("glm4serve.api")
T = TypeVar("T")

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the error code of a prompt and reply the context cannot hold
MAX_REQUEST_ID = 256  # characters of a client's request id, which every chunk of its reply carries

# Longer prompts are tokenized in a worker thread so other requests keep streaming meanwhile.
_THREAD_TOKENIZE_CHARS = 16384


class ClientDisconnected(Exception):
    pass


class ContextLengthError(APIError):
    """A prompt and reply the context cannot hold (a 400, code context_length_exceeded, in vLLM's words), with
    the counts, for the APIs that word it otherwise (Anthropic's)."""

    def __init__(self, prompt_tokens: int, requested: int, limit: int, param: str | None):
        super().__init__(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
                              f"completion). Please reduce the prompt or max_tokens.", "invalid_request_error", param,
                         CONTEXT_LENGTH_EXCEEDED)
        self.prompt_tokens, self.requested, self.limit = prompt_tokens, requested, limit


@dataclass
class ServingContext:
    engine: EngineClient | None  # None while the model loads
    tokenizer: Tokenizer
    settings: ServerSettings
    model_name: str
    max_model_len: int
    metrics: Metrics
    response_store: ResponseStore
    conversations: ConversationStore
    background: BackgroundResponses
    live: dict[str, RequestMetrics] = field(default_factory=dict)  # requests streaming, by engine request id
    created: int = field(default_factory=lambda: int(time.time()))
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapters served: name -> folder (adapters.py)
    lora_updates: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time
    # JSON Schema checks (check_schemas): threads of their own, as a few huge schemas take tens of
    # seconds and must not hold the default pool's threads, which tokenize long prompts
    schema_checks: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="schema-check"))

    @cached_property
    def sampling_defaults(self) -> dict:
        """temperature/top_p/... for requests that leave them out: the checkpoint's generation_config.json's, as
        the settings say (generation_config, override_generation_config)."""
        return self.settings.sampling_defaults(self.tokenizer.sampling_defaults)

    def tokens_as_ids(self, req) -> bool:
        """Whether a request's logprobs name tokens "token_id:{id}": its own say, else the server's."""
        asked = req.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids if asked is None else asked

    # ---- checks -------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.engine is None or not self.engine.is_alive:
            raise APIError(503, "the model is not loaded or the engine has stopped", "service_unavailable_error",
                           headers={"Retry-After": RETRY_AFTER_DRAINING})

    def check_model(self, name: str | None) -> str | None:
        """A request's `model`, when it names one, must be the served model (by any of its names) or one of
        its LoRA adapters (404 otherwise): the adapter's name, None for the base model."""
        if not name or name == self.model_name or name in self.settings.model_aliases:
            return None
        if name in self.loras:
            return name
        raise self.unknown_model(name)

    @staticmethod
    def unknown_model(name: str) -> APIError:
        return APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")

    def fit_max_tokens(self, prompt_len: int, requested: int | None, param: str = "messages") -> int:
        """The request's max_tokens, defaulting to the rest of the context; 400 when it cannot fit."""
        limit = self.max_model_len
        if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
            raise ContextLengthError(prompt_len, requested or 0, limit, param)
        if requested is not None:
            return requested
        cap = self.settings.max_tokens_limit  # the server's cap also bounds the default
        return limit - prompt_len if cap is None else min(cap, limit - prompt_len)

    def truncate(self, prompt_ids: list[int], keep: int | None, max_tokens: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens; -1: as many as the context
        holds beside the reply (max_tokens, or one token when the request leaves it to the context)."""
        if keep is None:
            return prompt_ids
        if keep == 0 or keep > self.max_model_len:
            raise invalid_request(f"truncate_prompt_tokens must be -1 or between 1 and the model's maximum context "
                                  f"length ({self.max_model_len}), got {keep}", "truncate_prompt_tokens")
        if keep == -1:
            keep = max(1, self.max_model_len - (max_tokens or 1))
        return prompt_ids[-keep:]

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param)

    async def bad_words_token_ids(self, words: list[str] | None) -> list[list[int]] | None:
        """vLLM's bad_words as token sequences: each word as written alone and after a space (two
        tokenizations, both banned); special-token text is that token, as vLLM encodes it."""
        seqs: dict[tuple[int, ...], None] = {}  # each once, in order
        for word in dict.fromkeys(w.lstrip() for w in words or ()):
            for variant in (word, " " + word):
                if ids := await self.encode(variant):
                    seqs[tuple(ids)] = None
        return [list(s) for s in seqs] or None

    def check_params(self, params: SamplingParams) -> None:
        if params.min_tokens > params.max_tokens:  # max_tokens as defaulted and capped (fit_max_tokens)
            raise invalid_request(f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({params.max_tokens}, "
                                  "the most this request may generate here)", "min_tokens")
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")
        if params.allowed_token_ids:
            self.check_token_ids(params.allowed_token_ids, "allowed_token_ids")
        if params.stop_token_ids:
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")

    async def compile_guided(self, params: SamplingParams, param: str) -> None:
        """Compile the request's grammar now, in a worker thread: a schema the grammar engine
        cannot compile is a 400 before anything streams, and the engine loop finds it cached."""
        if params.guided is None:
            return
        try:
            await self.engine.compile_guided(params.guided)
        except ValueError as e:
            raise invalid_request(str(e), param) from e

    async def check_schemas(self, body) -> None:
        """400 naming the first JSON Schema of `body` that is not valid or, constraining the reply, not
        enforceable: checked in a worker thread, which a large schema keeps for seconds."""
        schemas = body.schemas()
        if not schemas:
            return
        problem = await asyncio.get_running_loop().run_in_executor(self.schema_checks, schema_problem, schemas)
        if problem is not None:
            raise invalid_request(problem[1], problem[0])

    async def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if len(text) > _THREAD_TOKENIZE_CHARS:  # off the event loop: a long text takes seconds
            return await asyncio.to_thread(self.tokenizer.encode, text, allow_special=allow_special)
        return self.tokenizer.encode(text, allow_special=allow_special)

    async def chat_prompt_ids(self, body, tools: list[dict] | None) -> list[int]:
        """A chat body's messages -> the checkpoint's chat template -> token ids; 400 when unrenderable."""
        try:
            text = render_prompt([m.for_template() for m in body.messages], tools=tools,
                                 chat_template=self.settings.chat_template or self.tokenizer.chat_template,
                                 add_generation_prompt=body.add_generation_prompt,
                                 template_kwargs=body.chat_template_kwargs,
                                 continue_final_message=body.continue_final_message)
        except TemplateError as e:
            raise invalid_request(str(e), "messages") from e
        return await self.encode(text)

    # ---- generation ---------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Output]:
        """engine.generate with metrics. Whoever stops iterating early (client gone, error) must
        aclose() this generator; its cleanup then aborts the request in the engine."""
        timing = self.metrics.start_request(params.n, params.max_tokens)
        stream = self.engine.generate(prompt_ids, params, request_id=request_id)
        finished: set[int] = set()
        left_by = ABORT  # what the choices left unfinished count as
        self.live[request_id] = timing
        timeout = self.settings.request_timeout_seconds
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                while True:
                    try:
                        out = await _next_before(stream, deadline)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        self.metrics.timeouts.inc()
                        raise APIError(408, f"The request did not finish within this server's limit of "
                                       f"{timeout:g} seconds and was stopped.", "timeout_error",
                                       code="request_timeout") from None
                    timing.on_output(out)
                    if out.finish_reason is not None:
                        finished.add(out.index)
                    yield out
            except ValueError as e:  # the engine refuses requests it can never serve
                left_by = ERROR
                raise invalid_request(f"the engine refused this request: {e}") from e
            except EngineError:  # and ConstraintError
                left_by = ERROR
                raise
        finally:
            timing.close(left_by)
            del self.live[request_id]
            if len(finished) < params.n:
                # Shielded: this runs while the response task is being cancelled (disconnect).
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                try:
                    self.engine.abort(request_id)
                except Exception:  # the engine may already have dropped it
                    log.debug("abort(%s) failed", request_id, exc_info=True)

    def open(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[Output]:
        """`generate`, once the engine has said it would take the request: what it would refuse
        is a 400 here, while the HTTP status can still say so, not an error event in a stream."""
        try:
            self.engine.check_request(prompt_ids, params)
        except ValueError as e:
            raise invalid_request(f"the engine refused this request: {e}") from e
        return self.generate(prompt_ids, params, request_id)

    def end_choice(self, request_id: str, index: int, *, leaving: bool = False) -> None:
        """One choice's reply ended before the engine's end (parallel_tool_calls false), as at a stop. Unless its
        reader is `leaving` the request (which aborts all of it), the choice stops decoding now and its siblings
        go on; its stream's last output then says 'abort', which its reader skips."""
        timing = self.live.get(request_id)
        if timing is not None:
            timing.finish(index, STOP)
        if not leaving:
            self.engine.abort(request_id, index)


def reply_ids(prefix: str, request: Request | None, body_id: str | None) -> tuple[str, str]:
    """(the reply's id, the engine's) as vLLM names replies: `{prefix}-{X-Request-Id}`, else
    `{prefix}-{the body's request_id}`, else a random one. The engine's id is unique whatever clients send."""
    own = uuid.uuid4().hex
    given = (request.headers.get("x-request-id") if request is not None else None) or body_id
    if given is not None and len(given) > MAX_REQUEST_ID:
        raise invalid_request(f"the request id (X-Request-Id or request_id) is longer than {MAX_REQUEST_ID} "
                              "characters", "request_id")
    return (f"{prefix}-{given}", f"{prefix}-{given}-{own}") if given else (f"{prefix}-{own}", f"{prefix}-{own}")


def check_finish(reason: str | None) -> None:
    if reason == ABORT:  # not ours: we only abort requests whose client is gone
        raise APIError(503, "the request was aborted by the server", "server_error")


async def respond(ctx: ServingContext, request: Request, stream: bool, events: Callable[[], AsyncIterator[bytes]],
                  whole: Callable[[], Awaitable[BaseModel | dict]], end: StreamEnd = StreamEnd()) -> Response:
    """A streamed reply of events(), or whole()'s reply as one JSON body, cancelled if the client
    hangs up first."""
    if stream:
        return sse_response(events(), ctx.settings, end)
    try:
        response = await cancel_on_disconnect(request, whole())
    except ConstraintError as e:
        raise invalid_request(f"the reply cannot go on under its constraint: {e}", None) from e
    except EngineError as e:
        raise server_error(f"the engine failed this request: {e}") from e
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; the engine request is aborted
    return JSONResponse(response if isinstance(response, dict) else response.model_dump(mode="json"))


async def _next_before(stream: AsyncIterator[T], deadline: float | None) -> T:
    """The next item, or TimeoutError at the deadline (the cancelled wait aborts the engine request)."""
    if deadline is None:
        return await anext(stream)
    return await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive: yields (which, item)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream):
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item, None))
        except Exception as e:
            queue.put_nowait((i, None, e))
        finally:
            queue.put_nowait((i, done, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (a non-streamed generation) but cancel it if the client hangs up first, so
    the engine stops spending compute on a reply nobody will read."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
