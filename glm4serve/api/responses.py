"""POST /v1/responses: the Responses API over the chat route's path.

A request becomes a chat completion request (responses_request.py) and runs as one: the same
prompt, tool parsing and grammars. What differs is the reply's shape. Whole, it is a response
object whose `output` holds a message item (the text) and a function_call item per call (a
custom_tool_call item for a custom tool's, its input the call's one argument), after a
reasoning item with the thinking when a reasoning parser splits it off (GLM-Z1; its tokens are
usage's reasoning_tokens). Streamed, it is typed events, each with a `sequence_number`:
response.created and .in_progress, then per item output_item.added, its deltas (output_text.delta,
reasoning_text.delta, function_call_arguments.delta or custom_tool_call_input.delta) and its .done
events, and last
response.completed (or response.incomplete when max_output_tokens cut the reply). A failure midway
is an `error` event and response.failed; the stream has no `[DONE]`.

A finished reply is stored (response_store.py) unless the request says `store: false`, and added to
its `conversation` if it names one (conversations.py), before its last event goes out, so a client may
follow up on it as soon as it has it. A reply that failed, or whose client went away, is neither.

Logprobs belong to output text in this API: a reply that is function calls carries none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from glm4serve.chat.reasoning import ThinkingTokens
from glm4serve.engine.types import LENGTH, Output

from .body import Body
from .chat import ChatPlan, ChoiceStream, collect_chat, prepare_chat, prompt_tools
from .conversations import Conversation, check_unique_ids
from .errors import APIError, invalid_request, validation_error
from .limits import check_chat_limits
from .schemas import ChatCompletionRequest
from .replies import Usage
from .response_store import StoredResponse
from .responses_request import (
    ItemReference,
    ResponsesRequest,
    in_responses_terms,
    item_resources,
    new_id,
    parse_items,
)
from .responses_tools import CUSTOM_INPUT, OfferedTool, offer
from .gate import RELEASE
from .serving import CONTEXT_LENGTH_EXCEEDED, ServingContext, respond
from .streaming import StreamEnd, keep_alive, sse_response, typed_event, with_error_events

log = logging.getLogger("glm4serve.api")


class ResponseBuilder:
    """One reply's output items, built step by step (text, a call's start, its arguments), and
    the stream events that announce each step. The whole reply is built the same way, its
    events unused, so both shapes hold the same items."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, plan: ChatPlan | None, offered: list[OfferedTool],
                 history: list[dict] = (), new_items: list[dict] = (), conversation: Conversation | None = None):
        """plan: None for a request refused before any plan was made (its stream says so and ends). history: the
        items it continues from (a previous response's context, or the conversation's items); new_items: its own
        input, as stored and listed (item_resources)."""
        self.fixed = _fixed_fields(ctx, req, plan)
        self.store = ctx.response_store if self.fixed["store"] else None
        self.new_items = list(new_items)
        self.input_items = [*history, *new_items]  # the context it is stored with
        self.conversations = ctx.conversations
        self.conversation = conversation
        self.output: list[dict] = []
        self.sequence_number = 0
        self._item: dict | None = None  # the item being written, the last of `output`
        self._tools = {t.name: t for t in offered}  # by the name the model calls them
        self._custom_arguments = ""  # a custom tool's call's arguments so far: its input once they are whole
        self.final: dict | None = None  # the response it came to: completed, incomplete or failed

    def event(self, type: str, **fields) -> bytes:
        body = {"type": type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return typed_event(body)

    def in_progress(self) -> bytes:
        """response.in_progress: after response.created, and again to keep a stream alive that brings nothing."""
        return self.event("response.in_progress", response=self.response("in_progress"))

    def error_event(self, error: APIError) -> bytes:
        """A failure midway: the `error` event, then `response.failed` with the error, as OpenAI ends such a
        stream (clients such as Codex wait for a response.* event to end it)."""
        code = error.code or error.type
        failed = self.final = {**self.response("failed"), "error": {"code": code, "message": error.message}}
        return (self.event("error", code=code, message=error.message, param=error.param)
                + self.event("response.failed", response=failed))

    # ---- items ----------------------------------------------------------------------------------

    def text(self, text: str, logprobs: list[dict]) -> list[bytes]:
        events = []
        if self._item is None or self._item["type"] != "message":
            events += self.close("completed")
            item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            events += self._open(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self._index,
                                     content_index=0, part=part))
            item["content"].append(part)
        part = self._item["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        if text:
            events.append(self.event("response.output_text.delta", item_id=self._item["id"], output_index=self._index,
                                     content_index=0, delta=text, logprobs=logprobs))
        return events

    def reasoning(self, text: str) -> list[bytes]:
        """The model's thinking (with a reasoning parser): a reasoning item with one reasoning_text part."""
        events = []
        if self._item is None or self._item["type"] != "reasoning":
            events += self.close("completed")
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "encrypted_content": None,
                    "status": "in_progress"}
            events += self._open(item)
            part = {"type": "reasoning_text", "text": ""}
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self._index,
                                     content_index=0, part=part))
            item["content"].append(part)
        self._item["content"][0]["text"] += text
        if text:
            events.append(self.event("response.reasoning_text.delta", item_id=self._item["id"],
                                     output_index=self._index, content_index=0, delta=text))
        return events

    def call(self, call_id: str, name: str) -> list[bytes]:
        events = self.close("completed")
        tool = self._tools.get(name)
        if tool is not None:
            name = tool.call_name
        if tool is not None and tool.custom:
            self._custom_arguments = ""
            item = {"id": new_id("ctc"), "type": "custom_tool_call", "status": "in_progress", "call_id": call_id,
                    "name": name, "input": ""}
        else:
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                    "name": name, "arguments": ""}
        if tool is not None and tool.namespace is not None:
            item["namespace"] = tool.namespace
        return events + self._open(item)

    def arguments(self, fragment: str) -> list[bytes]:
        if self._item["type"] == "custom_tool_call":  # its input is one value of the JSON: read once it is whole
            self._custom_arguments += fragment
            return []
        self._item["arguments"] += fragment
        return [self.event("response.function_call_arguments.delta", item_id=self._item["id"],
                           output_index=self._index, delta=fragment)]

    def close(self, status: str) -> list[bytes]:
        """Finish the open item, if any, with its .done events."""
        item, self._item = self._item, None
        if item is None:
            return []
        item["status"] = status
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        if item["type"] == "message":
            part = item["content"][0]
            events = [self.event("response.output_text.done", **where, content_index=0, text=part["text"],
                                 logprobs=part["logprobs"]),
                      self.event("response.content_part.done", **where, content_index=0, part=part)]
        elif item["type"] == "reasoning":
            part = item["content"][0]
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"]),
                      self.event("response.content_part.done", **where, content_index=0, part=part)]
        elif item["type"] == "custom_tool_call":
            item["input"] = _custom_input(self._custom_arguments)
            events = [self.event("response.custom_tool_call_input.delta", **where, delta=item["input"]),
                      self.event("response.custom_tool_call_input.done", **where, input=item["input"])]
        else:
            events = [self.event("response.function_call_arguments.done", **where, name=item["name"],
                                 arguments=item["arguments"])]
        return events + [self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    @property
    def _index(self) -> int:
        return len(self.output) - 1

    def _open(self, item: dict) -> list[bytes]:
        self.output.append(item)
        self._item = item
        return [self.event("response.output_item.added", output_index=self._index, item=item)]

    # ---- the response object ---------------------------------------------------------------------

    def response(self, status: str, usage: dict | None = None) -> dict:
        return {**self.fixed, "status": status, "output": self.output, "usage": usage,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None}

    def keep(self, response: dict) -> dict:
        """The finished response, added to its conversation (a 400 when the conversation cannot hold it: the
        response fails, and is not stored) and stored."""
        conversation = self.conversation
        if conversation is not None and not self.conversations.kept(conversation):
            log.warning("response %s not added to conversation %s: the conversation is gone", response["id"],
                        conversation.id)
        elif conversation is not None:
            self.conversations.add(conversation, self.new_items + response["output"], "input")
        if self.store is not None:
            self.store.put(response, self.input_items)
        self.final = response
        return response

    def finish(self, finish_reason: str) -> tuple[str, list[bytes]]:
        """Close the last item (an empty message when the reply had neither text nor calls, only
        thinking perhaps): the response's status, and the events."""
        answered = any(item["type"] != "reasoning" for item in self.output)
        events = [] if answered else self.text("", [])
        status = "incomplete" if finish_reason == LENGTH else "completed"
        return status, events + self.close(status)


def _custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the function it was offered as: their one string; the text
    as written when the model wrote something else."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and value.keys() == {CUSTOM_INPUT} and isinstance(value[CUSTOM_INPUT], str):
        return value[CUSTOM_INPUT]
    return arguments


def _fixed_fields(ctx: ServingContext, req: ResponsesRequest, plan: ChatPlan | None) -> dict:
    """The response object's fields that the reply does not change: mostly the request, echoed (as sent, where
    no plan says what they came to)."""
    if isinstance(req.tool_choice, Body):
        tool_choice = req.tool_choice.model_dump()
    else:
        tool_choice = req.tool_choice or "auto"
    text_format = {"type": "text"}
    if req.text and req.text.format:
        text_format = req.text.format.model_dump(by_alias=True, exclude_none=True)
    return {
        "id": new_id("resp"), "object": "response", "created_at": plan.created if plan else int(time.time()),
        "model": plan.model if plan else req.model or ctx.model_name,
        "error": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": plan.params.temperature if plan else req.temperature,
        "top_p": plan.params.top_p if plan else req.top_p, "top_logprobs": req.top_logprobs,
        "tool_choice": tool_choice, "tools": [t.model_dump() for t in req.tools or []],
        "text": {"format": text_format}, "truncation": req.truncation or "disabled", "metadata": req.metadata or {},
        "user": req.user, "previous_response_id": req.previous_response_id, "reasoning": None,
        "conversation": {"id": req.conversation_id} if req.conversation_id is not None else None,
        "background": bool(req.background), "store": req.store is not False and ctx.response_store.enabled,
    }


def _usage(chat: Usage) -> dict:
    return {"input_tokens": chat.prompt_tokens, "input_tokens_details": chat.prompt_tokens_details.model_dump(),
            "output_tokens": chat.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": chat.completion_tokens_details.reasoning_tokens
                                      if chat.completion_tokens_details else 0},
            "total_tokens": chat.total_tokens}


# ---- streamed -------------------------------------------------------------------------------


async def _stream_response(ctx: ServingContext, plan: ChatPlan, logprobs: bool, builder: ResponseBuilder,
                           outputs: AsyncIterator[Output]) -> AsyncIterator[bytes]:
    yield builder.event("response.created", response=builder.response("in_progress"))
    yield builder.in_progress()
    choice = ChoiceStream(plan, ctx.tokenizer)
    pending: list[dict] = []  # logprobs of tokens whose text has not come out yet
    answering = False  # past the thinking (with a reasoning parser)
    finish_reason = LENGTH
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            step = choice.step(out, logprobs)
            pending += step.logprobs
            finish_reason = step.finish_reason or finish_reason
            for delta in step.deltas:
                if "reasoning_content" in delta:
                    for event in builder.reasoning(delta["reasoning_content"]):
                        yield event
                    continue
                if "content" in delta:
                    if plan.reasoning and not answering:  # and its tokens' logprobs
                        pending, answering = _after_thinking(pending), True
                    entries, pending = pending, []
                    for event in builder.text(delta["content"], entries):
                        yield event
                    continue
                [call] = delta["tool_calls"]
                if "id" in call:
                    pending = []  # a call's tokens: no output text to carry them
                    events = builder.call(call["id"], call["function"]["name"])
                else:
                    events = builder.arguments(call["function"]["arguments"])
                for event in events:
                    yield event
            if choice.ended_early:  # before the engine's end (chat.ChoiceStream.step): the request is aborted
                ctx.end_choice(plan.engine_id, 0, leaving=True)
                break
    last = builder.output[-1]["type"] if builder.output else None
    if plan.reasoning and not answering:  # no answer text came: the answer's tokens are those after the tag
        pending = _after_thinking(pending) if choice.thinking_tokens.done else []
    if pending and last not in ("function_call", "custom_tool_call"):  # the stop token's, after the last text
        for event in builder.text("", pending):
            yield event
    status, events = builder.finish(finish_reason)
    for event in events:
        yield event
    thinking = choice.thinking_tokens.count if plan.reasoning else None
    usage = _usage(Usage.of(len(plan.prompt_ids), choice.num_tokens, choice.details, thinking))
    yield builder.event(f"response.{status}", response=builder.keep(builder.response(status, usage)))


def _events(ctx: ServingContext, plan: ChatPlan, logprobs: bool, builder: ResponseBuilder) -> AsyncIterator[bytes]:
    """The reply's stream, kept alive by `response.in_progress` events while it brings none (streaming.keep_alive):
    Codex drops a stream with no event for its idle timeout, which a held call or a long prefill may pass on a
    slow machine."""
    return keep_alive(_stream_response(ctx, plan, logprobs, builder, ctx.open(plan.prompt_ids, plan.params,
                                                                               plan.engine_id)),
                      ctx.settings.sse_ping_seconds,
                      builder.in_progress)


async def _refused_stream(ctx: ServingContext, req: ResponsesRequest, error: APIError,
                          offered: list[OfferedTool]) -> AsyncIterator[bytes]:
    """A request refused before it ran, as a stream: created, then the error and response.failed."""
    builder = ResponseBuilder(ctx, req, None, offered)
    yield builder.event("response.created", response=builder.response("in_progress"))
    yield builder.error_event(error)


# ---- whole ----------------------------------------------------------------------------------


async def _whole_response(ctx: ServingContext, plan: ChatPlan, chat_req, builder: ResponseBuilder) -> dict:
    reply = await collect_chat(ctx, plan, chat_req)
    [choice] = reply.choices
    message = choice.message
    if message.reasoning_content:
        builder.reasoning(message.reasoning_content)
    if message.content is not None and (message.content or not message.tool_calls):
        logprobs = choice.logprobs["content"] if choice.logprobs and not message.tool_calls else []
        if plan.reasoning:
            logprobs = _after_thinking(logprobs)
        builder.text(message.content, logprobs)
    for call in message.tool_calls or []:
        builder.call(call.id, call.function.name)
        builder.arguments(call.function.arguments)
    status, _ = builder.finish(choice.finish_reason)
    return builder.keep(builder.response(status, _usage(reply.usage)))


def _start_background(ctx: ServingContext, plan: ChatPlan, chat_req: ChatCompletionRequest, builder: ResponseBuilder,
                      stream: bool, release_request) -> Response:
    """Run the reply as the server's own task (background.py): the response queued, or its stream followed."""
    outputs = ctx.open(plan.prompt_ids, plan.params, plan.engine_id)  # what the engine refuses is a 400 still
    job = ctx.background.start(builder, lambda: with_error_events(  # its job keeps it alive (background.py)
        _stream_response(ctx, plan, chat_req.logprobs, builder, outputs),
        StreamEnd(error_event=builder.error_event, done=None)), release_request)
    if stream:
        return sse_response(ctx.background.follow(job), ctx.settings, StreamEnd(done=None))
    return JSONResponse(job.snapshot())


def _after_thinking(entries: list[dict]) -> list[dict]:
    """The logprob entries of the answer: those after the token that completes `</think>`."""
    thinking = ThinkingTokens()
    n = thinking.feed(bytes(entry["bytes"]) for entry in entries)
    return entries[n:] if thinking.done else entries


# ---- route ----------------------------------------------------------------------------------


def find_stored(ctx: ServingContext, response_id: str, previous: bool = False) -> StoredResponse:
    """A stored response; else a 404, or for `previous_response_id` (previous=True) a 400."""
    stored = ctx.response_store.get(response_id)
    if stored is None:
        why = "" if ctx.response_store.enabled else " (this server stores no responses: --response-store-memory 0)"
        if previous:
            raise APIError(400, f"Previous response with id {response_id!r} not found{why}.",
                           "invalid_request_error", "previous_response_id", "previous_response_not_found")
        raise APIError(404, f"Response with id {response_id!r} not found{why}.", "invalid_request_error",
                       code="not_found")
    return stored


def _context(ctx: ServingContext, req: ResponsesRequest) -> tuple[list[dict], Conversation | None]:
    """The items a request continues from (its previous response's context and output, or its conversation's
    items), and its conversation."""
    if req.previous_response_id is not None:
        ctx.background.check_not_running(req.previous_response_id, "previous_response_id")
        return find_stored(ctx, req.previous_response_id, previous=True).context, None
    if req.conversation_id is not None:
        conversation = ctx.conversations.find(req.conversation_id, "conversation")
        return list(conversation.items), conversation
    return [], None


def _resolve_references(ctx: ServingContext, req: ResponsesRequest, history: list[dict]) -> None:
    """The request's item_reference input items replaced by the items of a stored response they name (a 400
    for an id none holds); one naming an item of the context it continues from is dropped: the item is there."""
    if isinstance(req.input, str) or not any(isinstance(item, ItemReference) for item in req.input):
        return
    known = {item["id"] for item in history}
    resolved = []
    for i, item in enumerate(req.input):
        if isinstance(item, ItemReference) and item.id in known:
            continue
        if isinstance(item, ItemReference):
            found = ctx.response_store.item(item.id)
            if found is None:
                why = "" if ctx.response_store.enabled else " (this server stores no responses)"
                raise invalid_request(f"Item with id {item.id!r} not found{why}.", f"input.{i}")
            item = parse_items([found])[0]
        resolved.append(item)
    req.input = resolved


def _as_chat(ctx: ServingContext, req: ResponsesRequest, offered: list[OfferedTool],
             history: list[dict]) -> ChatCompletionRequest:
    """The chat request of the reply that continues from `history`."""
    try:
        chat_req = req.to_chat(parse_items(history), offered)
    except ValidationError as e:
        raise validation_error(RequestValidationError(e.errors())) from None
    check_chat_limits(chat_req, ctx.settings)
    return chat_req


async def count_input_tokens(ctx: ServingContext, req: ResponsesRequest) -> dict:
    """POST /v1/responses/input_tokens: the prompt's tokens, as the reply would be given them."""
    ctx.check_model(req.model)
    offered = offer(req.tools, req.tool_choice)
    try:
        history = _context(ctx, req)[0]
        _resolve_references(ctx, req, history)
        chat_req = _as_chat(ctx, req, offered, history)
        prompt_ids = await ctx.chat_prompt_ids(chat_req, prompt_tools(ctx, chat_req))
    except APIError as e:
        raise in_responses_terms(e, offered) from e
    return {"object": "response.input_tokens", "input_tokens": len(prompt_ids)}


async def create_response(ctx: ServingContext, req: ResponsesRequest, request: Request) -> Response:
    if req.background and not ctx.response_store.enabled:
        raise invalid_request("background responses are stored, and this server stores none "
                              "(--response-store-memory 0)", "background")
    offered = offer(req.tools, req.tool_choice)
    try:
        history, conversation = _context(ctx, req)
        _resolve_references(ctx, req, history)
        new_items = check_unique_ids(history, item_resources(req.input_items), "input")
        if conversation is not None:
            ctx.conversations.check_room(conversation, new_items, "input")
        chat_req = _as_chat(ctx, req, offered, history)
        plan = await prepare_chat(ctx, chat_req, freeform_tools=frozenset(t.name for t in offered if t.custom))
    except APIError as e:
        error = in_responses_terms(e, offered)
        if req.stream and error.code == CONTEXT_LENGTH_EXCEEDED:
            # in the stream, as OpenAI's API reports it: clients such as Codex then compact the conversation
            return sse_response(_refused_stream(ctx, req, error, offered), ctx.settings, StreamEnd(done=None))
        raise error from e
    builder = ResponseBuilder(ctx, req, plan, offered, history, new_items, conversation)
    if req.background:
        return _start_background(ctx, plan, chat_req, builder, req.stream, getattr(request.state, RELEASE, None))
    return await respond(ctx, request, req.stream, lambda: _events(ctx, plan, chat_req.logprobs, builder),
                         lambda: _whole_response(ctx, plan, chat_req, builder),
                         StreamEnd(error_event=builder.error_event, done=None))
