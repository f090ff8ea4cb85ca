"""Stand-ins for the API tests: a scripted AsyncEngine and the small GLM-4-style tokenizer.

FakeEngine implements the engine's asyncio interface (generate / abort / stats / is_alive).
Each choice replays a scripted reply, one token per step, choices interleaved; it honours
max_tokens, stop token ids, ignore_eos, skip_special_tokens and logprobs, decodes with UTF-8
hold-back like the real detokenizer, and records every call, abort and early close.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from glm4serve.api.app import create_app
from glm4serve.api.settings import ServerSettings
from glm4serve.engine.types import LENGTH, STOP, EngineError, EngineStats, Output, SamplingParams, TokenLogprob
from glm4serve.model.small_tokenizer import write_small_tokenizer
from glm4serve.model.tokenizer import Tokenizer

MODEL = "glm-4-test"


@lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    out = tempfile.mkdtemp(prefix="glm4serve-api-tok-")
    write_small_tokenizer(out, num_merges=400)
    return Tokenizer.from_dir(out)


@dataclass
class Call:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class FakeEngine:
    tokenizer: Tokenizer
    # reply of choice i = replies[i % len(replies)]; a callable gets the call and returns the list
    replies: list[str] | Callable[[Call], list[str]] = field(default_factory=lambda: ["\nHello there!"])
    step_delay: float = 0.0  # seconds between steps
    fail_after_steps: int | None = None  # raise EngineError after this many steps
    # picks a token among the logit-biased ones (a biased request ignores the script)
    choose_biased: Callable[[set[int], "Call"], int] = lambda allowed, call: min(allowed)
    finish_reason_override: str | None = None  # e.g. "abort"
    refuse_with: Exception | None = None  # raised before the first await, like a refused request
    is_alive: bool = True
    engine_stats: EngineStats = field(default_factory=lambda: EngineStats(
        num_running=3, num_waiting=2, kv_blocks_total=100, kv_blocks_used=25,
        num_preemptions_total=4, prefix_cache_queries=50, prefix_cache_hits=20))
    calls: list[Call] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    started: asyncio.Event | None = None

    def stats(self) -> EngineStats:
        return self.engine_stats

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _script(self, call: Call) -> list[list[int]]:
        replies = self.replies(call) if callable(self.replies) else self.replies
        if call.params.logit_bias:
            top = max(call.params.logit_bias.values())
            allowed = {t for t, b in call.params.logit_bias.items() if b == top}
            return [[self.choose_biased(allowed, call)] for _ in range(call.params.n)]
        return [self.tokenizer.encode(replies[i % len(replies)], allow_special=True) for i in range(call.params.n)]

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        call = Call(list(prompt_ids), params, request_id or "req")
        self.calls.append(call)
        if self.refuse_with is not None:
            raise self.refuse_with
        scripts = self._script(call)
        stops = set(params.stop_token_ids or [])  # extra stop ids, on top of the model's own
        if not params.ignore_eos:
            stops |= set(self.tokenizer.stop_token_ids)
        emitted = [[] for _ in scripts]  # token ids so far per choice
        sent_text = ["" for _ in scripts]
        done = [False] * len(scripts)
        steps = 0
        try:
            while not all(done):
                if self.fail_after_steps is not None and steps >= self.fail_after_steps:
                    raise EngineError("scripted failure")
                await asyncio.sleep(self.step_delay)
                if self.started is not None:
                    self.started.set()
                steps += 1
                for i, script in enumerate(scripts):
                    if done[i]:
                        continue
                    pos = len(emitted[i])
                    token = script[pos] if pos < len(script) else self.tokenizer.stop_token_ids[0]
                    emitted[i].append(token)
                    reason = None
                    text_ids = emitted[i]
                    if token in stops:
                        reason, text_ids = STOP, emitted[i][:-1]
                    elif len(emitted[i]) >= params.max_tokens:
                        reason = LENGTH
                    text = self.tokenizer.decode(text_ids, skip_special_tokens=params.skip_special_tokens)
                    if reason is None and text.endswith("\ufffd"):
                        text = sent_text[i]  # half a character: hold it back
                    delta, sent_text[i] = text[len(sent_text[i]):], text
                    if reason is not None:
                        done[i] = True
                        reason = self.finish_reason_override or reason
                    logprobs = None
                    if params.logprobs is not None:
                        vocab = self.tokenizer.vocab_size
                        top = [((token + k) % vocab, -0.25 * (k + 1)) for k in range(params.logprobs)]
                        logprobs = [TokenLogprob(token, -0.5 - 0.01 * pos, top)]
                    yield Output(call.request_id, i, [token], delta, logprobs, reason,
                                 token if reason == STOP else None, len(prompt_ids), len(emitted[i]))
        finally:
            if not all(done):
                self.closed_early.append(call.request_id)


def make_app(engine: FakeEngine | None, tokenizer: Tokenizer | None = None, max_model_len: int = 4096, **settings):
    tokenizer = tokenizer or (engine.tokenizer if engine else small_tokenizer())
    return create_app(engine, tokenizer, ServerSettings(**settings), MODEL, max_model_len)


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
