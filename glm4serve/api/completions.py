"""POST /v1/completions: raw prompts (text or token ids, one or several) -> text completions.

Several prompts run as separate engine requests side by side; choice `index` is
`prompt_number * n + choice`, as in OpenAI and vLLM.

`response_format` (a vLLM extension here) constrains each completion to JSON, from its first
character: no leading whitespace.

`echo` with `logprobs` scores the prompt too (its first token has none), and `max_tokens: 0` with
`echo` returns the prompt alone: how evaluation harnesses read a model's log-likelihoods. The engine
still samples one token for it, which the reply leaves out. The echoed prompt is its tokens decoded
as the reply's are (`skip_special_tokens` applies to both), so the text offsets index it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from glm4serve.engine.types import LENGTH, Output, SamplingParams

from .logprobs import CompletionLogprobs, echo_text, vllm_prompt_logprobs
from .replies import (
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
    completion_choice_delta,
    stop_reason,
    stream_chunk,
)
from .schemas import CompletionRequest
from .serving import ServingContext, check_finish, merge_streams, reply_ids, respond
from .streaming import sse_data


@dataclass
class PromptJob:
    prompt_ids: list[int]
    prompt_text: str  # what echo sends: logprobs.echo_text
    params: SamplingParams
    engine_id: str  # the prompt's request in the engine


@dataclass
class CompletionPlan:
    request_id: str  # the reply's id
    created: int
    jobs: list[PromptJob]
    model: str  # what the reply names as its model: the LoRA adapter's name, else the served model's


async def prepare_completion(ctx: ServingContext, req: CompletionRequest, request: Request | None = None
                             ) -> CompletionPlan:
    ctx.check_ready()
    lora = ctx.check_model(req.model)
    await ctx.check_schemas(req)
    request_id, engine_id = reply_ids("cmpl", request, req.request_id)
    jobs = []
    bad_words = await ctx.bad_words_token_ids(req.bad_words)  # the same for every prompt
    for p, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str):
            ids = await ctx.encode(prompt)
            if req.add_special_tokens:
                ids = ctx.tokenizer.with_prefix(ids)
        else:
            ctx.check_token_ids(prompt, "prompt")
            ids = prompt
        if req.truncate_prompt_tokens is not None:
            ids = ctx.truncate(ids, req.truncate_prompt_tokens, req.max_tokens)
        text = echo_text(ctx.tokenizer, ids, req.skip_special_tokens) if req.echo else ""
        if req.echo_only and len(ids) <= ctx.max_model_len:  # the prompt alone may fill the context
            max_tokens = 1
        else:
            max_tokens = ctx.fit_max_tokens(len(ids), req.max_tokens, "prompt")
        params = req.sampling_params(max_tokens, req.logprobs, ctx.sampling_defaults)
        params.bad_words_token_ids = bad_words
        params.lora = lora
        ctx.check_params(params)
        await ctx.compile_guided(params, req.guided_param)  # cached after the first prompt
        jobs.append(PromptJob(ids, text, params, f"{engine_id}-{p}"))
    return CompletionPlan(request_id, int(time.time()), jobs, lora or ctx.model_name)


def _outputs(ctx: ServingContext, plan: CompletionPlan) -> AsyncIterator[tuple[int, Output]]:
    # ctx.open refuses (400) before any stream starts: the ones opened before it are dropped unstarted
    return merge_streams([ctx.open(j.prompt_ids, j.params, j.engine_id) for j in plan.jobs])


async def _stream_completion(ctx: ServingContext, plan: CompletionPlan, req: CompletionRequest,
                             outputs: AsyncIterator[tuple[int, Output]]) -> AsyncIterator[bytes]:
    n, usage_on = req.n, req.include_usage

    def chunk(index: int, text: str, logprobs: dict | None = None, finish_reason: str | None = None,
              **vllm) -> bytes:
        usage = None
        if req.continuous_usage:  # the counts so far of the chunk's choice
            usage = Usage.of(len(plan.jobs[index // n].prompt_ids), num_tokens.get(index, 0))
        if req.return_token_ids:  # the prompt's on a choice's first chunk, then each chunk's own tokens
            if index not in started:
                vllm["prompt_token_ids"] = plan.jobs[index // n].prompt_ids
            vllm.setdefault("token_ids", [])
        else:
            vllm.pop("token_ids", None)
        started.add(index)
        return sse_data(stream_chunk("text_completion", plan.request_id, plan.created, plan.model,
                                     [completion_choice_delta(index, text, logprobs, finish_reason, **vllm)],
                                     usage, usage_on))

    started: set[int] = set()  # choices that sent a chunk

    logprobs: dict[int, CompletionLogprobs] = {}
    num_tokens: dict[int, int] = {}
    pending_ids: dict[int, list[int]] = {}  # tokens whose text is held back (a split character, a stop string's start)
    eos_token_id = ctx.tokenizer.eos_token_id
    details: dict[int, PromptTokensDetails] = {}  # by prompt
    scored_echo = req.echo and req.logprobs is not None  # the prompt's logprobs come with its first output
    if req.echo and not scored_echo:
        for p, job in enumerate(plan.jobs):
            for c in range(n):
                yield chunk(p * n + c, job.prompt_text)
    async with contextlib.aclosing(outputs):
        async for p, out in outputs:
            check_finish(out.finish_reason)
            index, job = p * n + out.index, plan.jobs[p]
            if out.finish_reason is not None and out.index == 0:  # the first choice computed the prompt
                details[p] = PromptTokensDetails.of(out)
            if req.logprobs is not None:
                choice_logprobs = logprobs.setdefault(
                    index, CompletionLogprobs(ctx.tokenizer, job.params.skip_special_tokens, ctx.tokens_as_ids(req)))
            if scored_echo and out.prompt_logprobs is not None:
                part = choice_logprobs.add_prompt(job.prompt_ids, out.prompt_logprobs, req.logprobs)
                yield chunk(index, job.prompt_text, part)
            if req.echo_only:  # the engine's one token is no part of the reply
                if out.finish_reason is not None:
                    yield chunk(index, "", None, LENGTH, stop_reason=None)
                continue
            num_tokens[index] = out.num_output_tokens
            pending_ids[index] = pending_ids.get(index, []) + out.token_ids
            part = choice_logprobs.add(out.logprobs) if req.logprobs is not None and out.logprobs else None
            if out.text or part or out.finish_reason is not None:
                last = {} if out.finish_reason is None else {"stop_reason": stop_reason(out, eos_token_id)}
                yield chunk(index, out.text, part, out.finish_reason, token_ids=pending_ids.pop(index), **last)
    if usage_on:
        usage = Usage.of(sum(len(j.prompt_ids) for j in plan.jobs), sum(num_tokens.values()),
                         sum(details.values(), PromptTokensDetails()))
        yield sse_data(stream_chunk("text_completion", plan.request_id, plan.created, plan.model, [], usage, True))


async def _collect_completion(ctx: ServingContext, plan: CompletionPlan, req: CompletionRequest) -> CompletionResponse:
    n = req.n
    count = len(plan.jobs) * n
    texts: list[list[str]] = [[plan.jobs[k // n].prompt_text] if req.echo else [] for k in range(count)]
    logprobs = [CompletionLogprobs(ctx.tokenizer, plan.jobs[k // n].params.skip_special_tokens, ctx.tokens_as_ids(req))
                for k in range(count)]
    prompt_logprobs: list[list | None] = [None] * count  # vLLM's
    reasons: list[str | None] = [None] * count
    stop_reasons: list[int | str | None] = [None] * count
    token_ids: list[list[int]] = [[] for _ in range(count)]
    num_tokens = [0] * count
    details: dict[int, PromptTokensDetails] = {}  # by prompt
    outputs = _outputs(ctx, plan)
    async with contextlib.aclosing(outputs):
        async for p, out in outputs:
            check_finish(out.finish_reason)
            index = p * n + out.index
            if out.finish_reason is not None:
                if out.index == 0:  # the first choice computed the prompt
                    details[p] = PromptTokensDetails.of(out)
                reasons[index] = LENGTH if req.echo_only else out.finish_reason
                stop_reasons[index] = None if req.echo_only else stop_reason(out, ctx.tokenizer.eos_token_id)
            if out.prompt_logprobs is not None:
                if req.echo and req.logprobs is not None:
                    logprobs[index].add_prompt(plan.jobs[p].prompt_ids, out.prompt_logprobs, req.logprobs)
                if req.prompt_logprobs is not None:
                    prompt_logprobs[index] = vllm_prompt_logprobs(ctx.tokenizer, out.prompt_logprobs,
                                                                  req.prompt_logprobs)
            if req.echo_only:  # the engine's one token is no part of the reply
                continue
            texts[index].append(out.text)
            token_ids[index] += out.token_ids
            num_tokens[index] = out.num_output_tokens
            if req.logprobs is not None and out.logprobs:
                logprobs[index].add(out.logprobs)
    choices = [CompletionChoice(index=k, text="".join(texts[k]), finish_reason=reasons[k] or LENGTH,
                                stop_reason=stop_reasons[k],
                                logprobs=logprobs[k].as_dict() if req.logprobs is not None else None,
                                prompt_logprobs=prompt_logprobs[k],
                                token_ids=token_ids[k] if req.return_token_ids else None,
                                prompt_token_ids=plan.jobs[k // n].prompt_ids if req.return_token_ids else None)
               for k in range(count)]
    usage = Usage.of(sum(len(j.prompt_ids) for j in plan.jobs), sum(num_tokens),
                     sum(details.values(), PromptTokensDetails()))
    return CompletionResponse(id=plan.request_id, created=plan.created, model=plan.model,
                              choices=choices, usage=usage)


async def completions(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    plan = await prepare_completion(ctx, req, request)
    return await respond(ctx, request, req.stream, lambda: _stream_completion(ctx, plan, req, _outputs(ctx, plan)),
                         lambda: _collect_completion(ctx, plan, req))
