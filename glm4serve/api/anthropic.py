"""POST /v1/messages: Anthropic's Messages API over the chat route's path.

A request becomes a chat completion request (anthropic_request.py) and runs as one. Whole, the reply is a
message: its `content` blocks (thinking, when a reasoning parser splits it off; the text; a tool_use block
per call, its `input` the call's arguments, parsed), its `stop_reason` (end_turn; max_tokens; stop_sequence,
with the `stop_sequence` that matched; tool_use) and `usage` (the prompt's tokens read from the prefix cache
are `cache_read_input_tokens`, the rest `input_tokens`). Streamed, it is Anthropic's events: message_start, ping,
for each block content_block_start, its deltas (text_delta, thinking_delta, input_json_delta) and
content_block_stop, then message_delta (the stop reason, and the usage) and message_stop. A failure midway is
an `error` event; errors before are Anthropic's envelope (errors.py). POST /v1/messages/count_tokens counts a
request's prompt.
"""

from __future__ import annotations

import contextlib
import json
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from glm4serve.engine.types import LENGTH, Output

from .anthropic_request import CountTokensRequest, MessagesRequest
from .chat import ChatPlan, ChoiceStream, collect_chat, prepare_chat, prompt_tools
from .errors import APIError
from .limits import check_chat_limits
from .responses_request import new_id
from .serving import ContextLengthError, ServingContext, respond
from .streaming import StreamEnd, keep_alive, typed_event


def _event(kind: str, **fields) -> bytes:
    return typed_event({"type": kind, **fields})


def _error_event(error: APIError) -> bytes:
    return _event("error", error=error.anthropic_body()["error"])


def _too_long(error: ContextLengthError) -> APIError:
    """The context's refusal in Anthropic's words, which Claude Code reads: it compacts the conversation when the
    prompt is too long, and asks for fewer tokens when the reply would not fit."""
    if error.prompt_tokens >= error.limit:
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.limit} maximum"
    else:
        message = (f"input length and `max_tokens` exceed context limit: {error.prompt_tokens} + {error.requested} > "
                   f"{error.limit}, decrease input length or `max_tokens` and try again")
    return APIError(400, message, error.type, error.param, error.code)


def _stop(finish_reason: str | None, stop_reason: int | str | None, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence, from the chat reply's finish_reason and vLLM's stop_reason."""
    if finish_reason == LENGTH or finish_reason is None:
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": output_tokens}


def _tool_use_id(call_id: str) -> str:
    """A call's id as Anthropic's API names them (`toolu_...`); a tool_result may send back either."""
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict:
    """A call's arguments as tool_use's input: an object; {} for arguments max_tokens cut off."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _message(message_id: str, plan: ChatPlan, content: list[dict], stop: tuple[str, str | None] = (None, None),
             usage: dict | None = None) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": plan.model, "content": content,
            "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}


# ---- whole ----------------------------------------------------------------------------------


async def _whole_message(ctx: ServingContext, plan: ChatPlan, chat_req) -> dict:
    reply = await collect_chat(ctx, plan, chat_req)
    [choice] = reply.choices
    message = choice.message
    content = []
    if message.reasoning_content:
        content.append({"type": "thinking", "thinking": message.reasoning_content, "signature": ""})
    if message.content:
        content.append({"type": "text", "text": message.content})
    for call in message.tool_calls or []:
        content.append({"type": "tool_use", "id": _tool_use_id(call.id), "name": call.function.name,
                        "input": _input(call.function.arguments)})
    usage = reply.usage
    return _message(new_id("msg"), plan, content, _stop(choice.finish_reason, choice.stop_reason,
                                                         bool(message.tool_calls)),
                    _usage(usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens))


# ---- streamed -------------------------------------------------------------------------------


class _Blocks:
    """The reply's content blocks as they stream: each opened, written to and closed with its events."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self.started = False  # message_start is out (what every other event must follow)
        self.index = -1
        self.kind: str | None = None  # the open block's type
        self.called = False

    def start(self, cached: int) -> bytes:
        """message_start, and a ping after it as Anthropic's streams have."""
        self.started = True
        usage = _usage(len(self.plan.prompt_ids), cached, 0)
        return _event("message_start", message=_message(new_id("msg"), self.plan, [], usage=usage)) + _event("ping")

    def beat(self) -> bytes:
        """A ping; before the first output (a long prefill), message_start first: it cannot yet say how much of the
        prompt the prefix cache held, which message_delta's usage then does."""
        return _event("ping") if self.started else self.start(0)

    def write(self, kind: str, text: str) -> list[bytes]:
        """More of a text or thinking block (opened when the last one was another)."""
        events = []
        if self.kind != kind:
            block = {"type": kind, kind: "", "signature": ""} if kind == "thinking" else {"type": kind, kind: ""}
            events = self.close() + self._open(block)
        if text:
            events.append(_event("content_block_delta", index=self.index,
                                 delta={"type": f"{kind}_delta", kind: text}))
        return events

    def call(self, call_id: str, name: str) -> list[bytes]:
        self.called = True
        return self.close() + self._open({"type": "tool_use", "id": _tool_use_id(call_id), "name": name,
                                          "input": {}})

    def arguments(self, text: str) -> list[bytes]:
        return [_event("content_block_delta", index=self.index, delta={"type": "input_json_delta",
                                                                        "partial_json": text})]

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", index=self.index)]

    def _open(self, block: dict) -> list[bytes]:
        self.index += 1
        self.kind = block["type"]
        return [_event("content_block_start", index=self.index, content_block=block)]


def _events(ctx: ServingContext, plan: ChatPlan) -> AsyncIterator[bytes]:
    """The reply's stream, with a `ping` event (as Anthropic's streams have) after each sse_ping_seconds that brings
    none (a long prefill; a call held until whole: streaming.keep_alive)."""
    blocks = _Blocks(plan)
    outputs = ctx.open(plan.prompt_ids, plan.params, plan.engine_id)
    return keep_alive(_stream_message(ctx, plan, outputs, blocks), ctx.settings.sse_ping_seconds, blocks.beat)


async def _stream_message(ctx: ServingContext, plan: ChatPlan, outputs: AsyncIterator[Output],
                          blocks: _Blocks) -> AsyncIterator[bytes]:
    prompt_tokens = len(plan.prompt_ids)
    choice = ChoiceStream(plan, ctx.tokenizer)
    finish_reason = stop_reason = None
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            if not blocks.started:  # with the first output, which says how much of the prompt was cached
                yield blocks.start(out.num_cached_tokens)
            step = choice.step(out, False)
            finish_reason, stop_reason = step.finish_reason or finish_reason, step.stop_reason or stop_reason
            for delta in step.deltas:
                if "reasoning_content" in delta:
                    events = blocks.write("thinking", delta["reasoning_content"])
                elif "content" in delta:
                    events = blocks.write("text", delta["content"])
                else:
                    [call] = delta["tool_calls"]
                    events = (blocks.call(call["id"], call["function"]["name"]) if "id" in call
                              else blocks.arguments(call["function"]["arguments"]))
                for event in events:
                    yield event
            if choice.ended_early:  # before the engine's end (chat.ChoiceStream.step): the request is aborted
                ctx.end_choice(plan.engine_id, 0, leaving=True)
                break
    for event in blocks.close():
        yield event
    stop, sequence = _stop(finish_reason, stop_reason, blocks.called)
    usage = _usage(prompt_tokens, choice.details.cached_tokens, choice.num_tokens)
    yield _event("message_delta", delta={"stop_reason": stop, "stop_sequence": sequence}, usage=usage)
    yield _event("message_stop")


# ---- routes ---------------------------------------------------------------------------------


async def create_message(ctx: ServingContext, req: MessagesRequest, request: Request) -> Response:
    chat_req = req.to_chat()
    try:
        check_chat_limits(chat_req, ctx.settings)
        plan = await prepare_chat(ctx, chat_req, request)
    except ContextLengthError as e:
        raise req.in_its_terms(_too_long(e)) from e
    except APIError as e:
        raise req.in_its_terms(e) from e
    return await respond(ctx, request, req.stream,
                         lambda: _events(ctx, plan),
                         lambda: _whole_message(ctx, plan, chat_req),
                         StreamEnd(error_event=_error_event, done=None))


async def count_tokens(ctx: ServingContext, req: CountTokensRequest) -> dict:
    """POST /v1/messages/count_tokens: the prompt's tokens, as the reply would be given them."""
    ctx.check_model(req.model)
    chat_req = req.to_chat(count_only=True)
    try:
        prompt_ids = await ctx.chat_prompt_ids(chat_req, prompt_tools(ctx, chat_req))
    except APIError as e:
        raise req.in_its_terms(e) from e
    return {"input_tokens": len(prompt_ids)}
