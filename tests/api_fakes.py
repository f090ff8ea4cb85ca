"""What the API tests serve: the real engine (LLMEngine + AsyncEngine) over a scripted model runner,
with the small GLM-4-style tokenizer.

ScriptedRunner stands in for the model runner only (model/runner.py's interface): for each row that
wants logits it puts a peak on the next token of a scripted reply, then on a stop token. Stops,
max_tokens, UTF-8 hold-back, logprobs, forks, aborts and failures are the real engine's.
RecordingEngine is the real AsyncEngine that also records what the API asked of it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
import uvicorn

from glm4serve.api.app import create_app
from glm4serve.api.settings import ServerSettings
from glm4serve.engine.async_engine import AsyncEngine
from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.sequence import Sequence
from glm4serve.engine.types import SamplingParams
from glm4serve.model.batch import ScheduledBatch
from glm4serve.model.small_tokenizer import write_small_tokenizer
from glm4serve.model.tokenizer import Tokenizer

MODEL = "glm-4-test"
HELLO = "\nHello there!"  # the default reply: GLM-4 opens a chat reply with an empty metadata line


@lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    with tempfile.TemporaryDirectory() as out:  # from_dir reads everything it needs
        write_small_tokenizer(out, num_merges=400)
        return Tokenizer.from_dir(out)


@dataclass
class Call:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str | None


# the reply of choice i: replies[i % len(replies)], or what replies(call) returns for that request; a
# reply is text (special-token text encoded as the special token) or its token ids
Replies = list[str | list[int]] | tuple[str | list[int], ...] | Callable[[Call], list[str | list[int]]]


class ScriptedRunner:
    """A model runner whose model replays scripted replies. A row's request and choice are those of
    the engine's sequence with the chunk's seq_id. With n > 1 every choice samples its first token
    from choice 0's row (the engine forks after the prompt), so replies must share their first token."""

    def __init__(self, tokenizer, num_blocks: int, block_size: int, replies: Replies = (HELLO,), *,
                 step_delay: float = 0.0, fail_after_steps: int | None = None,
                 abort_after_tokens: int | None = None, peak: float = 40.0):
        self.tokenizer = tokenizer
        self.num_blocks, self.block_size = num_blocks, block_size
        self.replies = replies
        self.step_delay = step_delay  # seconds per forward, to keep requests in flight
        self.fail_after_steps = fail_after_steps  # forwards after this many raise, as a broken model would
        self.abort_after_tokens = abort_after_tokens  # the server aborts a request once it has this many
        self.peak = peak  # logit of the scripted token over 0 for the rest: 40 is picked at any temperature used here
        self.engine: LLMEngine | None = None  # set once built: its scheduler knows whose rows these are
        self.abort: Callable[[str], None] | None = None  # AsyncEngine.abort, for abort_after_tokens
        self.num_steps = 0
        self.decoded: dict[tuple[str, int], int] = {}  # (request id, choice) -> reply tokens it was fed
        self._scripts: dict[int, list[int]] = {}  # seq_id -> reply token ids

    def script(self, seq: Sequence) -> list[int]:
        if seq.seq_id not in self._scripts:
            replies = self.replies
            if callable(replies):
                replies = replies(Call(seq.prompt_token_ids, seq.params, seq.request_id))
            reply = replies[seq.index % len(replies)]
            self._scripts[seq.seq_id] = (self.tokenizer.encode(reply, allow_special=True) if isinstance(reply, str)
                                         else list(reply))
        return self._scripts[seq.seq_id]

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.num_steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_after_steps is not None and self.num_steps > self.fail_after_steps:
            raise RuntimeError("scripted forward failure")
        running = {s.seq_id: s for s in self.engine.scheduler.running}
        # prompt logprobs' rows (all_logits) stay 0: a uniform distribution over the vocabulary
        rows = list(itertools.accumulate(c.num_logit_rows for c in batch.chunks))
        logits = torch.zeros(rows[-1] if rows else 0, self.tokenizer.vocab_size)
        for end, chunk in zip(rows, batch.chunks):
            if not chunk.want_logits:
                continue
            r, seq = end - 1, running[chunk.seq_id]
            done = chunk.start + len(chunk.token_ids) - seq.num_prompt_tokens  # reply tokens already out
            self.decoded[seq.request_id, seq.index] = done
            script = self.script(seq)
            logits[r, script[done] if done < len(script) else self.tokenizer.stop_token_ids[0]] = self.peak
            if self.abort_after_tokens is not None and done >= self.abort_after_tokens:
                self.abort(seq.request_id)  # takes effect before the next step
        return logits

    def close(self) -> None:
        pass


class RecordingEngine(AsyncEngine):
    """The real AsyncEngine, recording the generate and abort calls it gets."""

    def __init__(self, engine: LLMEngine):
        super().__init__(engine)
        self.calls: list[Call] = []
        self.aborted: list[str | tuple[str, int]] = []  # request ids, or (request id, choice) for one choice

    @property
    def runner(self) -> ScriptedRunner:
        return self.engine.runner

    def generate(self, prompt_ids, params, request_id=None):
        self.calls.append(Call(list(prompt_ids), params, request_id))
        return super().generate(prompt_ids, params, request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append(request_id if index is None else (request_id, index))
        super().abort(request_id, index)


_started: list[AsyncEngine] = []  # shut down by the shutdown_engines fixture


@pytest.fixture(autouse=True)
def shutdown_engines():
    """Autouse in every test module that imports it: the engines a test started are shut down after
    it. (A module-scoped fixture is set up before this one, and shuts its engine down itself.)"""
    first = len(_started)
    yield
    while len(_started) > first:
        _started.pop().shutdown(timeout=5)


def start_engine(args: EngineArgs, max_model_len: int, tokenizer: Tokenizer | None = None,
                 **script) -> RecordingEngine:
    """The real engine for these engine arguments, over a ScriptedRunner(**script)."""
    tokenizer = tokenizer or small_tokenizer()
    num_blocks = args.num_kv_blocks or math.ceil(max_model_len / args.block_size)
    runner = ScriptedRunner(tokenizer, num_blocks, args.block_size, **script)
    llm = LLMEngine(runner, tokenizer, args.scheduler_config(max_model_len, "cpu"),
                    BlockPool(num_blocks, args.block_size), tokenizer.stop_token_ids, vocab_size=tokenizer.vocab_size)
    runner.engine = llm
    engine = RecordingEngine.start(lambda: llm)
    runner.abort = lambda request_id: AsyncEngine.abort(engine, request_id)  # the server's, not recorded
    _started.append(engine)
    return engine


def make_app(replies: Replies = (HELLO,), *, tokenizer: Tokenizer | None = None, max_model_len: int = 4096,
             step_delay: float = 0.0, fail_after_steps: int | None = None, abort_after_tokens: int | None = None,
             model_name: str = MODEL, **settings):
    """The app over a fresh real engine; `settings` (ServerSettings fields, the engine's included)
    reach both. The engine is engine_of(app)."""
    settings = ServerSettings(max_model_len=max_model_len, **settings)
    engine = start_engine(settings, max_model_len, tokenizer, replies=replies, step_delay=step_delay,
                          fail_after_steps=fail_after_steps, abort_after_tokens=abort_after_tokens)
    return create_app(engine, engine.engine.tokenizer, settings, model_name, max_model_len)


def full_blocks(call: Call, block_size: int = ServerSettings().block_size) -> int:
    """Prompt tokens in whole KV blocks: what a first request adds to the prefix cache."""
    return len(call.prompt_ids) // block_size * block_size


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """The app on real uvicorn in a thread, on a free localhost port: its base URL ("http://127.0.0.1:PORT"), for
    the SDKs' clients. The app's engine is shut down after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine_of(app).shutdown()


def engine_of(app) -> RecordingEngine:
    return app.state.serving.engine


def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    """Until the engine has no request left and every KV block is back in the pool."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()  # published by the loop thread at the end of each turn
        if s.num_running == s.num_waiting == s.kv_blocks_used == 0:
            break
        assert time.monotonic() < deadline, f"the engine is still busy: {s}"
        time.sleep(0.005)
    assert engine.engine.scheduler.num_requests == 0 and engine.engine.pool.num_used == 0


def sse_events(body: str) -> list[str]:
    """Raw SSE events of a body (each without its trailing blank line)."""
    assert body.endswith("\n\n"), body[-50:]
    return body[:-2].split("\n\n")


def sse_json(body: str) -> list[dict]:
    """The JSON data events, after checking framing: only `data:` lines and `: ping` comments,
    and exactly one final `data: [DONE]`."""
    import json

    events = [e for e in sse_events(body) if e != ": ping"]
    assert events[-1] == "data: [DONE]"
    out = []
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, e
        out.append(json.loads(e[len("data: "):]))
    return out


def choice_indices_and_usage(response, stream: bool) -> tuple[list[int], dict]:
    """A reply's choice indices (streamed: each that appears, in order) and its usage (streamed: the last chunk's)."""
    if stream:
        chunks = sse_json(response.text)
        return sorted({c["choices"][0]["index"] for c in chunks if c["choices"]}), chunks[-1]["usage"]
    return [c["index"] for c in response.json()["choices"]], response.json()["usage"]
