"""POST /v1/completions: raw prompts (text or token ids, one or several) -> text completions.

Several prompts run as separate engine requests side by side; choice `index` is
`prompt_number * n + choice`, as in OpenAI and vLLM.

`response_format` (a vLLM extension here) constrains each completion to JSON, from its first
character: no leading whitespace.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from glm4serve.engine.types import LENGTH, Output, SamplingParams

from .logprobs import CompletionLogprobs
from .replies import CompletionChoice, CompletionResponse, PromptTokensDetails, Usage, completion_choice_delta, stream_chunk
from .schemas import CompletionRequest
from .serving import ServingContext, check_finish, merge_streams, respond
from .streaming import sse_data


@dataclass
class PromptJob:
    prompt_ids: list[int]
    prompt_text: str  # for echo
    params: SamplingParams
    request_id: str


@dataclass
class CompletionPlan:
    request_id: str
    created: int
    jobs: list[PromptJob]


async def prepare_completion(ctx: ServingContext, req: CompletionRequest) -> CompletionPlan:
    ctx.check_ready()
    ctx.check_model(req.model)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = []
    for p, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str):
            ids = await ctx.encode(prompt)
            if req.add_special_tokens:
                ids = ctx.tokenizer.with_prefix(ids)
            text = prompt
        else:
            ctx.check_token_ids(prompt, "prompt")
            ids, text = prompt, ctx.tokenizer.decode(prompt)
        max_tokens = ctx.fit_max_tokens(len(ids), req.max_tokens, "prompt")
        params = req.sampling_params(max_tokens, req.logprobs, ctx.sampling_defaults)
        ctx.check_params(params)
        await ctx.compile_guided(params, "response_format")  # cached after the first prompt
        jobs.append(PromptJob(ids, text, params, f"{request_id}-{p}"))
    return CompletionPlan(request_id, int(time.time()), jobs)


def _outputs(ctx: ServingContext, plan: CompletionPlan) -> AsyncIterator[tuple[int, Output]]:
    # ctx.open refuses (400) before any stream starts: the ones opened before it are dropped unstarted
    return merge_streams([ctx.open(j.prompt_ids, j.params, j.request_id) for j in plan.jobs])


async def _stream_completion(ctx: ServingContext, plan: CompletionPlan, req: CompletionRequest,
                             outputs: AsyncIterator[tuple[int, Output]]) -> AsyncIterator[bytes]:
    n, usage_on = req.n, req.include_usage

    def chunk(choices: list[dict]) -> bytes:
        return sse_data(stream_chunk("text_completion", plan.request_id, plan.created, ctx.model_name, choices, None, usage_on))

    logprobs: dict[int, CompletionLogprobs] = {}
    num_tokens: dict[int, int] = {}
    details: dict[int, PromptTokensDetails] = {}  # by prompt
    if req.echo:
        for p, job in enumerate(plan.jobs):
            for c in range(n):
                yield chunk([completion_choice_delta(p * n + c, job.prompt_text)])
    async with contextlib.aclosing(outputs):
        async for p, out in outputs:
            check_finish(out.finish_reason)
            index = p * n + out.index
            num_tokens[index] = out.num_output_tokens
            if out.finish_reason is not None:  # the same counts on every output: read once
                details[p] = PromptTokensDetails.of(out)
            part = None
            if req.logprobs is not None and out.logprobs:
                choice_logprobs = logprobs.setdefault(index, CompletionLogprobs(
                    ctx.tokenizer, plan.jobs[p].params.skip_special_tokens))
                part = choice_logprobs.add(out.logprobs)
            if out.text or part or out.finish_reason is not None:
                yield chunk([completion_choice_delta(index, out.text, part, out.finish_reason)])
    if usage_on:
        usage = Usage.of(sum(len(j.prompt_ids) for j in plan.jobs), sum(num_tokens.values()),
                         sum(details.values(), PromptTokensDetails()))
        yield sse_data(stream_chunk("text_completion", plan.request_id, plan.created, ctx.model_name, [], usage, True))


async def _collect_completion(ctx: ServingContext, plan: CompletionPlan, req: CompletionRequest) -> CompletionResponse:
    n = req.n
    count = len(plan.jobs) * n
    texts: list[list[str]] = [[plan.jobs[k // n].prompt_text] if req.echo else [] for k in range(count)]
    logprobs = [CompletionLogprobs(ctx.tokenizer, plan.jobs[k // n].params.skip_special_tokens) for k in range(count)]
    reasons: list[str | None] = [None] * count
    num_tokens = [0] * count
    details: dict[int, PromptTokensDetails] = {}  # by prompt
    outputs = _outputs(ctx, plan)
    async with contextlib.aclosing(outputs):
        async for p, out in outputs:
            check_finish(out.finish_reason)
            index = p * n + out.index
            texts[index].append(out.text)
            num_tokens[index] = out.num_output_tokens
            if out.finish_reason is not None:  # the same counts on every output: read once
                details[p] = PromptTokensDetails.of(out)
            if req.logprobs is not None and out.logprobs:
                logprobs[index].add(out.logprobs)
            if out.finish_reason is not None:
                reasons[index] = out.finish_reason
    choices = [CompletionChoice(index=k, text="".join(texts[k]), finish_reason=reasons[k] or LENGTH,
                                logprobs=logprobs[k].as_dict() if req.logprobs is not None else None)
               for k in range(count)]
    usage = Usage.of(sum(len(j.prompt_ids) for j in plan.jobs), sum(num_tokens),
                     sum(details.values(), PromptTokensDetails()))
    return CompletionResponse(id=plan.request_id, created=plan.created, model=ctx.model_name,
                              choices=choices, usage=usage)


async def completions(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    plan = await prepare_completion(ctx, req)
    return await respond(ctx, request, req.stream, lambda: _stream_completion(ctx, plan, req, _outputs(ctx, plan)),
                         lambda: _collect_completion(ctx, plan, req))
