"""Response bodies (non-streamed) and the chunk dicts of streamed replies.

Stream chunks are plain dicts on purpose: which keys a delta carries *is* the wire format
(`{}` on the finish chunk, `id`/`name` only on a tool call's first delta), and a dict says so
more plainly than a model with exclusion rules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from glm4serve.engine.types import Output

_ONLY_WHEN_ASKED = Field(None, exclude_if=lambda v: v is None)  # vLLM's extra fields stay out of OpenAI's shape


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # read from the prefix cache, not computed
    cache_write_tokens: int = 0  # computed and added to the prefix cache

    @classmethod
    def of(cls, out: Output) -> "PromptTokensDetails":
        return cls(cached_tokens=out.num_cached_tokens, cache_write_tokens=out.num_cache_write_tokens)

    def __add__(self, other: "PromptTokensDetails") -> "PromptTokensDetails":
        return PromptTokensDetails(cached_tokens=self.cached_tokens + other.cached_tokens,
                                   cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # the thinking's, with a reasoning parser (chat/reasoning.py)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = _ONLY_WHEN_ASKED  # with a reasoning parser

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, details: PromptTokensDetails = PromptTokensDetails(),
           reasoning_tokens: int | None = None) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details,
                   completion_tokens_details=None if reasoning_tokens is None else
                   CompletionTokensDetails(reasoning_tokens=reasoning_tokens))


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON string, never an object


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    # vLLM's: the thinking, with a reasoning parser, under its newer name and its older one
    reasoning: str | None = _ONLY_WHEN_ASKED
    reasoning_content: str | None = _ONLY_WHEN_ASKED

    def with_thinking(self, thinking: str | None) -> "ChatMessageOut":
        return self.model_copy(update={"reasoning": thinking, "reasoning_content": thinking})


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM's: see stop_reason()
    token_ids: list[int] | None = _ONLY_WHEN_ASKED  # vLLM's return_token_ids: the reply's tokens


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = _ONLY_WHEN_ASKED  # vLLM's
    prompt_token_ids: list[int] | None = _ONLY_WHEN_ASKED  # vLLM's return_token_ids


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM's: see stop_reason()
    prompt_logprobs: list[dict[str, Any] | None] | None = _ONLY_WHEN_ASKED  # vLLM's
    token_ids: list[int] | None = _ONLY_WHEN_ASKED  # vLLM's return_token_ids: the reply's tokens, and its prompt's
    prompt_token_ids: list[int] | None = _ONLY_WHEN_ASKED


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm4serve"
    max_model_len: int
    root: str | None = None  # vLLM's: the model's (or LoRA adapter's) folder
    parent: str | None = None  # vLLM's: a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- stream chunks --------------------------------------------------------------------------


def stream_chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict],
                 usage: Usage | None = None, with_usage_field: bool = False) -> dict:
    """One streamed chunk; kind is its object: "chat.completion.chunk" or "text_completion"."""
    chunk = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage_field:  # OpenAI sends usage: null on every chunk when include_usage is on
        chunk["usage"] = usage.model_dump() if usage is not None else None
    return chunk


def chat_choice_delta(index: int, delta: dict, logprobs: dict | None = None,
                      finish_reason: str | None = None, **vllm) -> dict:
    """vllm: vLLM's keys beside OpenAI's (stop_reason on a choice's last chunk; token_ids when asked for)."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **vllm}


def completion_choice_delta(index: int, text: str, logprobs: dict | None = None,
                            finish_reason: str | None = None, **vllm) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **vllm}


def stop_reason(out: Output, eos_token_id: int | None) -> int | str | None:
    """vLLM's stop_reason of a choice's last output: the stop string or stop token id that ended it; None
    for the tokenizer's own end of text (GLM-4's <|endoftext|>, not <|user|> or <|observation|>), a
    length cut or an abort."""
    return None if out.stop_reason == eos_token_id else out.stop_reason


def tool_call_start_delta(index: int, call_id: str, name: str) -> dict:
    """First delta of a call: the only one with id, type and name (the SDK concatenates strings)."""
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def tool_args_delta(index: int, fragment: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
