"""Enforcing `tool_choice: "required"` and a named tool with a grammar.

GLM-4 calls a tool by answering `{name}\\n{json arguments}` right after `<|assistant|>`. A forced
call is decoded under a grammar of exactly that (guided.py): the name is one of the allowed
tools, the arguments are JSON valid against that tool's `parameters` schema, and then only a
stop token may follow. "required" lets the model pick among all tools, and after each whole call
also `<|assistant|>`, which GLM-4 writes before another call of the same reply (as vLLM's "required"
may make several; not with `parallel_tool_calls: false`); a named tool_choice allows that one tool,
once. A response_format waits for a turn that is not forced (as OpenAI applies it to the final answer).
"auto" stays unconstrained (the model may answer in prose or call several tools), but with a
response_format: the reply is then one call, or the answer in that format.
"""

from __future__ import annotations

from glm4serve.engine.types import GuidedSpec

from .messages import NamedToolChoice
from .schemas import ChatCompletionRequest


def forced_call_spec(req: ChatCompletionRequest, call_separator: int | None) -> GuidedSpec | None:
    """The grammar of the reply when tool_choice forces a call; None otherwise. call_separator: the token
    id of `<|assistant|>` (None where the tokenizer has none)."""
    if not req.forces_tool_call:
        return None
    tools = _parameters(req)
    if isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.function.name
        return GuidedSpec.tool_call({name: tools[name]})
    return GuidedSpec.tool_call(tools, call_separator=None if req.parallel_tool_calls is False else call_separator)


def call_or_format_spec(req: ChatCompletionRequest, reply: GuidedSpec) -> GuidedSpec:
    """tool_choice auto with a response_format (an agent with tools and a structured final answer): the
    reply is a call of one of the tools, or text in the format."""
    return GuidedSpec.tool_call(_parameters(req), otherwise=reply)


# A function without `parameters` (or with `{}`) takes none, as OpenAI reads it: its call's arguments are `{}`
NO_PARAMETERS = {"type": "object", "properties": {}}


def _parameters(req: ChatCompletionRequest) -> dict[str, dict]:
    """Each tool's parameters schema, by its name."""
    return {t.function.name: t.function.parameters or NO_PARAMETERS for t in req.tools or []}
