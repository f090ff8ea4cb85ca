"""Enforcing `tool_choice: "required"` and a named tool, without a grammar engine.

GLM-4 calls a tool by answering `{name}\\n{json}` right after `<|assistant|>`. So a forced call
is a prefill: the prompt is extended with the tokens of `{name}\\n`, and the model can only go
on with the arguments. For "required" with several tools the model picks the name itself, one
token at a time, with a +100 logit bias on exactly the tokens that continue some tool name
(sampling settings of the request apply, so temperature still varies the choice).
"""

from __future__ import annotations

import contextlib

from glm4serve.engine.types import SamplingParams

_ALLOWED_BIAS = 100.0  # logits live within a few tens; +100 leaves the others no probability


def spell_call_prefix(tokenizer, name: str) -> list[int]:
    """Token ids of `{name}\\n`, the start of a GLM-4 tool call (never special tokens)."""
    return tokenizer.encode(name + "\n", allow_special=False)


async def choose_tool_name(ctx, prompt_ids: list[int], names: list[str], params: SamplingParams,
                           request_id: str) -> tuple[str, list[int]]:
    """Let the model pick one of `names`; returns (name, ids of `{name}\\n`) to append to the prompt."""
    spelled = {name: spell_call_prefix(ctx.tokenizer, name) for name in names}
    chosen: list[int] = []
    while True:
        candidates = [n for n, ids in spelled.items() if ids[: len(chosen)] == chosen]
        if len(candidates) == 1:
            return candidates[0], spelled[candidates[0]]
        # Each spelling ends in "\n" and names have no newline, so no spelling is a prefix of
        # another: every candidate still has a next token.
        allowed = {spelled[n][len(chosen)] for n in candidates}
        if len(allowed) == 1:
            chosen.append(next(iter(allowed)))
            continue
        step = SamplingParams(max_tokens=1, n=1, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k, min_p=params.min_p, seed=params.seed,
                              logit_bias={t: _ALLOWED_BIAS for t in allowed}, ignore_eos=True,
                              skip_special_tokens=False)
        token = None
        step_id = f"{request_id}-toolname-{len(chosen)}"
        async with contextlib.aclosing(ctx.generate(prompt_ids + chosen, step, step_id)) as outputs:
            async for out in outputs:
                if out.token_ids and token is None:
                    token = out.token_ids[0]
        if token not in allowed:  # only if the engine ignored the bias; stay on a valid name
            token = spelled[candidates[0]][len(chosen)]
        chosen.append(token)
