"""Server-side limits on what one request may ask for (settings max_messages, max_n, ...).

Separate from the request schemas: those say what is valid OpenAI input, these say what this
deployment is willing to serve. Past a limit the answer is a 400 naming the parameter.
"""

from __future__ import annotations

from .errors import invalid_request
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ServerSettings


def _at_most(count: int, limit: int | None, param: str, what: str) -> None:
    if limit is not None and count > limit:
        raise invalid_request(f"{param}: {count} {what} exceed this server's limit of {limit}", param)


def _common(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, s: ServerSettings) -> None:
    _at_most(req.n, s.max_n, "n", "choices")
    _at_most(len(req.stop_list), s.max_stop, "stop", "stop strings")
    _at_most(len(req.bad_words or ()), s.max_stop, "bad_words", "bad words")  # each checked every step, as stops
    if max_tokens is not None:
        _at_most(max_tokens, s.max_tokens_limit, "max_tokens", "tokens")


def check_chat_limits(req: ChatCompletionRequest, s: ServerSettings) -> None:
    _at_most(len(req.messages), s.max_messages, "messages", "messages")
    _at_most(len(req.tools or ()), s.max_tools, "tools", "tools")
    _common(req, req.max_output_tokens, s)


def check_completion_limits(req: CompletionRequest, s: ServerSettings) -> None:
    """Also lowers the schema's default max_tokens (16) to the cap when the client left it out."""
    _at_most(len(req.prompts()), s.max_prompts, "prompt", "prompts")
    if "max_tokens" not in req.model_fields_set and req.max_tokens is not None and s.max_tokens_limit is not None:
        req.max_tokens = min(req.max_tokens, s.max_tokens_limit)
    _common(req, req.max_tokens, s)
