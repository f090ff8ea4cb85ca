"""POST /v1/chat/completions: messages -> GLM-4 prompt -> engine -> OpenAI reply, whole or streamed.

With tools (and tool_choice != "none") the engine decodes the `<|assistant|>` token between
several calls as the tool parser's CALL_MARK (tool_parser.py), not as text the model could also
write; other special tokens follow skip_special_tokens. GLM-4 answers `<|assistant|>\\n{content}`
(an empty metadata line), so one leading newline of a plain reply is dropped.

Structured output: `response_format` (json_object / json_schema) and a forced tool_choice
("required" or a named tool, tool_choice.py) put a grammar on the reply (SamplingParams.guided).
It is compiled before the engine sees the request, so a schema the grammar engine cannot
compile is a 400, not a 500 or an error inside a stream.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response

from glm4serve.chat.reasoning import THINK_END, THINK_START, StreamingReasoningParser, ThinkingTokens, split_reasoning
from glm4serve.chat.tool_parser import (
    CALL_MARK,
    ContentDelta,
    StreamingToolParser,
    ToolArgsDelta,
    ToolCallStart,
    opening_call,
    parse_reply,
)
from glm4serve.engine.types import LENGTH, STOP, Output, SamplingParams

from .logprobs import chat_logprob_entries, vllm_prompt_logprobs
from .replies import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessageOut,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
    chat_choice_delta,
    stop_reason,
    stream_chunk,
    tool_args_delta,
    tool_call_start_delta,
)
from .messages import NamedToolChoice
from .schemas import ChatCompletionRequest
from .serving import ServingContext, check_finish, reply_ids, respond
from .streaming import sse_data
from .tool_choice import call_or_format_spec, forced_call_spec

CALL_SEPARATOR = "<|assistant|>"  # the special token between several tool calls of one reply


@dataclass
class ChatPlan:
    """Everything decided before the engine runs."""

    request_id: str  # the reply's id
    engine_id: str  # the request's in the engine
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    tool_names: set[str] | None  # None: no tool parsing
    forced_call: bool  # tool_choice forces a call (a grammar enforces its format)
    echo: str  # vLLM's chat echo: the last assistant message, prepended to the reply
    strip_newline: bool
    reasoning: bool  # the reply's thinking is split from its answer (chat/reasoning.py)
    show_reasoning: bool  # ... and sent as reasoning (include_reasoning)
    logprob_token_ids: bool  # logprobs name tokens "token_id:{id}" (vLLM's return_tokens_as_token_ids)
    model: str  # what the reply names as its model: the LoRA adapter's name, else the served model's
    # a reply that calls tools finishes "tool_calls", but "stop" when tool_choice named the function (as
    # OpenAI's API and vLLM)
    call_finish_reason: str
    freeform_tools: frozenset[str]  # tools whose call takes any text as its input (tool_parser.py)
    one_call: bool  # parallel_tool_calls false: a reply's first call is its only one (tool_parser.py)


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, request: Request | None = None,
                       freeform_tools: frozenset[str] = frozenset()) -> ChatPlan:
    ctx.check_ready()
    lora = ctx.check_model(req.model)
    await ctx.check_schemas(req)
    prompt_ids = ctx.truncate(await ctx.chat_prompt_ids(req, prompt_tools(ctx, req)), req.truncate_prompt_tokens,
                              req.max_output_tokens)
    request_id, engine_id = reply_ids("chatcmpl", request, req.request_id)

    max_tokens = ctx.fit_max_tokens(len(prompt_ids), req.max_output_tokens)
    # guided by response_format, if any
    params = req.sampling_params(max_tokens, req.engine_logprobs, ctx.sampling_defaults)
    params.bad_words_token_ids = await ctx.bad_words_token_ids(req.bad_words)
    params.lora = lora
    params.stops_skip_leading_newline = req.add_generation_prompt  # the newline the reply's content leaves out
    ctx.check_params(params)
    separator = ctx.tokenizer.special_tokens.get(CALL_SEPARATOR)
    call_spec = forced_call_spec(req, separator)
    if call_spec is not None:  # a forced call: a response_format is for a later turn's answer
        params.guided = call_spec
    elif req.tools_active and params.guided is not None:
        params.guided = call_or_format_spec(req, params.guided)
    await ctx.compile_guided(params, "tools" if call_spec is not None else req.guided_param)
    if req.tools_active and separator is not None:
        params.special_token_text = {separator: CALL_MARK}

    last = req.messages[-1]
    echo = (last.text() or "") if req.echo and last.role == "assistant" else ""
    # a constrained reply has no thinking to split: its grammar holds from the first token
    reasoning = ctx.settings.reasoning_parser is not None and params.guided is None
    if reasoning:  # where the tokenizer has them as special tokens, the tags stay in the text to split on
        special = ctx.tokenizer.special_tokens
        tags = {special[t]: t for t in (THINK_START, THINK_END) if t in special}
        params.special_token_text = {**(params.special_token_text or {}), **tags}
    return ChatPlan(request_id, engine_id, int(time.time()), prompt_ids, params,
                    set(req.tool_names) if req.tools_active else None, call_spec is not None, echo,
                    strip_newline=req.add_generation_prompt, reasoning=reasoning, show_reasoning=req.include_reasoning,
                    logprob_token_ids=ctx.tokens_as_ids(req), model=lora or ctx.model_name,
                    call_finish_reason="stop" if isinstance(req.tool_choice, NamedToolChoice) else "tool_calls",
                    freeform_tools=freeform_tools, one_call=req.parallel_tool_calls is False)


def prompt_tools(ctx: ServingContext, req: ChatCompletionRequest) -> list[dict] | None:
    """The tools the prompt shows. Under tool_choice none the reply is never a call, but the model still sees
    the tools (vLLM's default)."""
    shown = req.tools_active or (req.tools and not ctx.settings.exclude_tools_when_tool_choice_none)
    return [t.as_given() for t in req.tools] if shown else None


def reply_token_bytes(plan: ChatPlan, tokenizer) -> Callable[[int], bytes]:
    """A reply token's bytes as its text has them: a think tag that is a special token as the tag."""
    tags = {t: text.encode() for t, text in (plan.params.special_token_text or {}).items()
            if text in (THINK_START, THINK_END)}
    return lambda t: tags.get(t) or tokenizer.token_bytes(t)


def reply_logprob_entries(plan: ChatPlan, tokenizer, out: Output) -> list[dict]:
    """The output's tokens' chat logprob entries, less the reply's opening "\\n" token where its content leaves
    that newline out: the entries' tokens read as the content does."""
    logprobs = out.logprobs or []
    opens_reply = out.num_output_tokens == len(out.token_ids)
    if plan.strip_newline and opens_reply and logprobs and tokenizer.token_bytes(logprobs[0].token_id) == b"\n":
        logprobs = logprobs[1:]
    return chat_logprob_entries(tokenizer, logprobs, plan.logprob_token_ids)


@dataclass
class ChoiceStep:
    """What one engine output adds to a streamed choice."""

    deltas: list[dict]  # OpenAI delta dicts, content or tool-call fragments
    logprobs: list[dict]  # the output's tokens' chat logprob entries (when asked for)
    token_ids: list[int]  # the output's tokens
    finish_reason: str | None  # on the choice's last output: the reason to send
    stop_reason: int | str | None = None  # and vLLM's stop_reason


class ChoiceStream:
    """One choice's text deltas -> OpenAI delta dicts (content or tool-call fragments)."""

    def __init__(self, plan: ChatPlan, tokenizer):
        self.parser = (StreamingToolParser(plan.tool_names, lenient=plan.forced_call, freeform=plan.freeform_tools,
                                           one_call=plan.one_call) if plan.tool_names else None)
        self.reasoning = StreamingReasoningParser() if plan.reasoning else None
        self.thinking_tokens = ThinkingTokens() if plan.reasoning else None
        self._token_bytes = reply_token_bytes(plan, tokenizer) if plan.reasoning else None
        self._strip_newline = self._strip_thinking_newline = plan.strip_newline
        self._tokenizer = tokenizer
        self._plan = plan
        self._call_finish_reason = plan.call_finish_reason
        self._show_thinking = plan.show_reasoning
        self.num_tokens = 0
        self.details = PromptTokensDetails()  # the prompt's cache counts, from the last output
        self.finished = False  # its last step is out: later outputs of the choice are not its reply's
        self.ended_early = False  # ... before the engine's end: the request is to be left (and so aborted)

    def step(self, out: Output, logprobs: bool) -> ChoiceStep:
        check_finish(out.finish_reason)
        self.num_tokens = out.num_output_tokens
        if self.thinking_tokens is not None:
            self.thinking_tokens.feed(map(self._token_bytes, out.token_ids))
        entries = reply_logprob_entries(self._plan, self._tokenizer, out) if logprobs else []
        deltas = self.feed(out.text) if out.text else []
        # parallel_tool_calls false: the opening call is whole and another began, which it drops; it ends here
        ended = self.parser is not None and self.parser.done
        if out.finish_reason is None and not ended:
            return ChoiceStep(deltas, entries, out.token_ids, None)
        self.details, self.finished, self.ended_early = PromptTokensDetails.of(out), True, out.finish_reason is None
        held, finish_reason = self.finish(out.finish_reason or STOP)
        return ChoiceStep(deltas + held, entries, out.token_ids, finish_reason,
                          stop_reason(out, self._tokenizer.eos_token_id))

    def feed(self, text: str) -> list[dict]:
        if self.reasoning is None:
            return self._answer(text)
        thinking, answer = self.reasoning.feed(text)
        return self._thinking(thinking) + (self._answer(answer) if answer else [])

    def _answer(self, text: str) -> list[dict]:
        if self.parser is None:
            return self._content(text)
        return self._deltas(self.parser.feed(text))

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """Deltas still held back, and the finish_reason to send."""
        thinking = self._thinking(self.reasoning.finish()) if self.reasoning is not None else []
        if self.parser is None:
            return thinking, reason
        deltas = self._deltas(self.parser.finish(truncated=reason == LENGTH))
        cut = reason == LENGTH and not self.parser.done
        return thinking + deltas, (self._call_finish_reason if self.parser.calls and not cut else reason)

    def _thinking(self, text: str) -> list[dict]:
        text = text.replace(CALL_MARK, "")  # an `<|assistant|>` while thinking is no call separator
        if self._strip_thinking_newline and text:
            self._strip_thinking_newline = False
            text = text.removeprefix("\n")
        return [{"reasoning": text, "reasoning_content": text}] if text and self._show_thinking else []

    def _deltas(self, events) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out += self._content(ev.text)
            elif isinstance(ev, ToolCallStart):
                out.append(tool_call_start_delta(ev.index, ev.id, ev.name))
            elif isinstance(ev, ToolArgsDelta):
                out.append(tool_args_delta(ev.index, ev.text))
        return out

    def _content(self, text: str) -> list[dict]:
        if self._strip_newline and text:
            self._strip_newline = False
            text = text.removeprefix("\n")
        return [{"content": text}] if text else []


# ---- streamed -------------------------------------------------------------------------------


async def _stream_chat(ctx: ServingContext, plan: ChatPlan, req: ChatCompletionRequest,
                       outputs: AsyncIterator[Output]) -> AsyncIterator[bytes]:
    n, usage_on = req.n, req.include_usage

    def chunk(i: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None, **vllm) -> bytes:
        usage = None
        if req.continuous_usage:  # the counts so far of the chunk's choice
            usage = Usage.of(len(plan.prompt_ids), choices[i].num_tokens)
        if req.return_token_ids:  # the tokens whose text the chunk carries, or held back before it
            vllm["token_ids"], pending_ids[i] = pending_ids[i], []
        body = stream_chunk("chat.completion.chunk", plan.request_id, plan.created, plan.model,
                            [chat_choice_delta(i, delta, logprobs, finish_reason, **vllm)], usage, usage_on)
        if req.return_token_ids and "role" in delta:
            body["prompt_token_ids"] = plan.prompt_ids
        return sse_data(body)

    choices = [ChoiceStream(plan, ctx.tokenizer) for _ in range(n)]
    pending_logprobs: list[list[dict]] = [[] for _ in range(n)]
    pending_ids: list[list[int]] = [[] for _ in range(n)]

    def take_logprobs(i: int) -> dict | None:
        if not pending_logprobs[i]:
            return None
        entries, pending_logprobs[i] = pending_logprobs[i], []
        return {"content": entries}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
        if plan.echo:
            yield chunk(i, {"content": plan.echo})
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            i = out.index
            if choices[i].finished:  # ended before the engine's end, and stopped there (end_choice)
                continue
            step = choices[i].step(out, req.logprobs)
            pending_logprobs[i] += step.logprobs
            pending_ids[i] += step.token_ids
            for delta in step.deltas:
                yield chunk(i, delta, take_logprobs(i))
            if step.finish_reason is not None:
                yield chunk(i, {}, take_logprobs(i), step.finish_reason, stop_reason=step.stop_reason)
                leaving = all(c.finished for c in choices) and any(c.ended_early for c in choices)
                if choices[i].ended_early:
                    ctx.end_choice(plan.engine_id, i, leaving=leaving)
                if leaving:
                    break
            elif not step.deltas and pending_logprobs[i] and not choices[i].parser:
                # Tokens that produced no text yet (a split character) still report logprobs.
                yield chunk(i, {"content": ""}, take_logprobs(i))
    if usage_on:
        # the prompt's cache counts are choice 0's, which computed the prompt
        usage = Usage.of(len(plan.prompt_ids), sum(c.num_tokens for c in choices), choices[0].details,
                         sum(c.thinking_tokens.count for c in choices) if plan.reasoning else None)
        yield sse_data(stream_chunk("chat.completion.chunk", plan.request_id, plan.created, plan.model, [], usage,
                                    True))


# ---- whole ----------------------------------------------------------------------------------


async def collect_chat(ctx: ServingContext, plan: ChatPlan, req: ChatCompletionRequest) -> ChatCompletionResponse:
    n = req.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[dict]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    stop_reasons: list[int | str | None] = [None] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    num_tokens = [0] * n
    thinking = [ThinkingTokens() for _ in range(n)] if plan.reasoning else None
    token_bytes = reply_token_bytes(plan, ctx.tokenizer) if plan.reasoning else None
    details = PromptTokensDetails()
    prompt_logprobs = None  # vLLM's, the same on every choice
    early = False
    outputs = ctx.open(plan.prompt_ids, plan.params, plan.engine_id)
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            i = out.index
            if reasons[i] is not None:  # ended before the engine's end, and stopped there (end_choice)
                continue
            check_finish(out.finish_reason)
            if out.prompt_logprobs is not None and prompt_logprobs is None:
                prompt_logprobs = vllm_prompt_logprobs(ctx.tokenizer, out.prompt_logprobs, req.prompt_logprobs)
            texts[i].append(out.text)
            token_ids[i] += out.token_ids
            num_tokens[i] = out.num_output_tokens
            if thinking is not None:
                thinking[i].feed(map(token_bytes, out.token_ids))
            if req.logprobs:
                logprobs[i] += reply_logprob_entries(plan, ctx.tokenizer, out)
            if out.finish_reason is not None:
                reasons[i], stop_reasons[i] = out.finish_reason, stop_reason(out, ctx.tokenizer.eos_token_id)
            elif CALL_MARK in out.text and _opening_call_is_whole(plan, "".join(texts[i])):
                reasons[i], early = STOP, True
                ctx.end_choice(plan.engine_id, i, leaving=all(reasons))
            if reasons[i] is not None and i == 0:  # the first choice computed the prompt
                details = PromptTokensDetails.of(out)
            if early and all(reasons):
                break
    choices = []
    for i in range(n):
        message, reason = _whole_message(ctx, plan, "".join(texts[i]), reasons[i] or LENGTH)
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason, stop_reason=stop_reasons[i],
                                  logprobs={"content": logprobs[i]} if req.logprobs else None,
                                  token_ids=token_ids[i] if req.return_token_ids else None))
    return ChatCompletionResponse(id=plan.request_id, created=plan.created, model=plan.model,
                                  choices=choices, usage=Usage.of(len(plan.prompt_ids), sum(num_tokens), details,
                                                                  sum(t.count for t in thinking) if thinking else None),
                                  prompt_logprobs=prompt_logprobs,
                                  prompt_token_ids=plan.prompt_ids if req.return_token_ids else None)


def _whole_message(ctx: ServingContext, plan: ChatPlan, text: str, reason: str) -> tuple[ChatMessageOut, str]:
    if plan.reasoning:
        thinking, answer = split_reasoning(text)
        thinking = _strip_first_newline(plan, thinking.replace(CALL_MARK, "")) or None
        thinking = thinking if plan.show_reasoning else None
        if answer is None:  # it never stopped thinking
            return ChatMessageOut(content=plan.echo or None).with_thinking(thinking), reason
        message, reason = _answer_message(ctx, plan, answer, reason)
        return message.with_thinking(thinking), reason
    return _answer_message(ctx, plan, text, reason)


def _opening_call_is_whole(plan: ChatPlan, text: str) -> bool:
    """parallel_tool_calls false: the reply so far opens its answer with a whole call, and another began: it ends
    here (ChoiceStream's parser says so when streamed)."""
    if not (plan.one_call and plan.tool_names):
        return False
    answer = split_reasoning(text)[1] if plan.reasoning else text
    return answer is not None and bool(opening_call(answer, plan.tool_names, lenient=plan.forced_call,
                                                    freeform=plan.freeform_tools))


def _answer_message(ctx: ServingContext, plan: ChatPlan, text: str, reason: str) -> tuple[ChatMessageOut, str]:
    if plan.tool_names is None:
        return ChatMessageOut(content=plan.echo + _strip_first_newline(plan, text)), reason
    # a forced call stays a call even when a stop string cut its JSON (lenient), as when streamed
    alone = opening_call(text, plan.tool_names, lenient=plan.forced_call,
                         freeform=plan.freeform_tools) if plan.one_call else []
    truncated = reason == LENGTH and not alone
    calls, content = (alone, "") if alone else parse_reply(text, plan.tool_names, truncated=truncated,
                                                           lenient=plan.forced_call, freeform=plan.freeform_tools)
    content = _strip_first_newline(plan, content)
    if not calls:
        return ChatMessageOut(content=plan.echo + content), reason
    tool_calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
    return ChatMessageOut(content=(plan.echo + content) or None, tool_calls=tool_calls), (
        LENGTH if truncated else plan.call_finish_reason)


def _strip_first_newline(plan: ChatPlan, text: str) -> str:
    return text.removeprefix("\n") if plan.strip_newline else text


# ---- route ----------------------------------------------------------------------------------


async def chat_completions(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Response:
    plan = await prepare_chat(ctx, req, request)
    return await respond(ctx, request, req.stream,
                         lambda: _stream_chat(ctx, plan, req, ctx.open(plan.prompt_ids, plan.params, plan.engine_id)),
                         lambda: collect_chat(ctx, plan, req))
