"""Request body of POST /v1/messages (Anthropic's Messages API), and the chat completion request it stands for.

Claude Code and the Anthropic SDKs speak this API; vLLM and SGLang serve it beside OpenAI's. A request becomes
a ChatCompletionRequest, so a reply takes the chat route's one path (template, tool parsing, grammars, limits):
`system` is the system message (and a turn of role system, which Claude Code sends among the others, one in
its place); a user turn's `tool_result` blocks are tool messages (in their place among its text); an assistant
turn's `tool_use` blocks its tool calls (their `input` as JSON arguments); `thinking` blocks sent back are
dropped, as GLM-4's template drops earlier thinking. A last assistant turn of text is a prefill, which the
reply goes on with (`continue_final_message`). `output_config.format` (or the beta's `output_format`), a JSON
schema, is the chat route's `response_format`. Images and documents stand in the
prompt as a line saying they were left out (GLM-4 reads text only). Tools with an `input_schema` are offered
as functions; Anthropic's own tools (web search, bash, the text editor: a `type` and no schema) run on
Anthropic's side and are left out. `tool_choice` any is OpenAI's "required", tool names one, and
`disable_parallel_tool_use` is `parallel_tool_calls: false`. `thinking` is taken and changes nothing: a
reasoning model's thinking (GLM-Z1) is split off by the server's reasoning parser and returned as a thinking
block.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from fastapi.exceptions import RequestValidationError
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from .body import Body, RequestBody
from .errors import APIError, validation_error
from .json_checks import invalid
from .messages import part_text
from .schemas import ChatCompletionRequest

_MEDIA = frozenset({"image", "document", "search_result", "container_upload"})  # Anthropic's media blocks


class TextBlock(Body):
    type: Literal["text"]
    text: str


class MediaBlock(Body):
    type: Literal["image", "document", "search_result", "container_upload"]

    @property
    def text(self) -> str:
        return part_text(self.type, None, None, "messages")


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class OtherResultBlock(Body):
    """A block of a tool's result that is neither text nor media (a tool search's tool_reference, ...)."""

    type: str

    @property
    def text(self) -> str:
        return f"[a {self.type} block left out]"


def _kind(block: Any) -> str | None:
    """A block's type, when it is a string (the tags look it up in sets)."""
    kind = block.get("type") if isinstance(block, dict) else getattr(block, "type", None)
    return kind if isinstance(kind, str) else None


def _result_block_tag(block: Any) -> str:
    kind = _kind(block)
    return "text" if kind == "text" else "media" if kind in _MEDIA else "other"


ResultBlock = Annotated[
    Union[Annotated[TextBlock, Tag("text")], Annotated[MediaBlock, Tag("media")],
          Annotated[OtherResultBlock, Tag("other")]],
    Discriminator(_result_block_tag),
]


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultBlock] = ""
    is_error: bool | None = None

    @property
    def text(self) -> str | list[dict]:
        if isinstance(self.content, str):
            return self.content
        return [{"type": "text", "text": block.text} for block in self.content]


class DroppedBlock(Body):
    """Thinking sent back (GLM-4's template keeps no earlier thinking), or a call of one of Anthropic's own tools
    and its result."""

    type: str


class UnsupportedBlock(Body):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        raise invalid("messages", f"content blocks of type {kind!r} are not supported: this server takes text, "
                                  f"image, document, tool_use, tool_result and thinking blocks")


_DROPPED = frozenset({"thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result",
                      "tool_search_tool_result",
                      "web_fetch_tool_result", "code_execution_tool_result", "bash_code_execution_tool_result",
                      "text_editor_code_execution_tool_result", "mcp_tool_use", "mcp_tool_result"})


def _block_tag(block: Any) -> str:
    kind = _kind(block)
    if kind in ("text", "tool_use", "tool_result"):
        return f"block[{kind}]"
    if kind in _MEDIA:
        return "block[media]"
    return "block[dropped]" if kind in _DROPPED else "block[unsupported]"


Block = Annotated[
    Union[
        Annotated[TextBlock, Tag("block[text]")],
        Annotated[MediaBlock, Tag("block[media]")],
        Annotated[ToolUseBlock, Tag("block[tool_use]")],
        Annotated[ToolResultBlock, Tag("block[tool_result]")],
        Annotated[DroppedBlock, Tag("block[dropped]")],
        Annotated[UnsupportedBlock, Tag("block[unsupported]")],
    ],
    Discriminator(_block_tag),
]


class Message(Body):
    role: Literal["user", "assistant", "system"]  # system: among the turns, as Claude Code sends it
    content: str | list[Block]

    def chat_messages(self) -> list[dict]:
        """As chat messages: a user turn's text runs and tool results in their order; an assistant turn's text
        and tool calls as one message; a system turn's text as a system message."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "system":
            text = [{"type": "text", "text": b.text} for b in self.content if isinstance(b, (TextBlock, MediaBlock))]
            return [{"role": "system", "content": text}] if text else []
        if self.role == "assistant":
            text = [{"type": "text", "text": b.text} for b in self.content if isinstance(b, (TextBlock, MediaBlock))]
            calls = [{"id": b.id, "type": "function",
                      "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                     for b in self.content if isinstance(b, ToolUseBlock)]
            if not text and not calls:
                return []
            return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]
        out: list[dict] = []
        for block in self.content:
            if isinstance(block, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text})
            elif isinstance(block, (TextBlock, MediaBlock)):
                part = {"type": "text", "text": block.text}
                if out and out[-1]["role"] == "user":
                    out[-1]["content"].append(part)
                else:
                    out.append({"role": "user", "content": [part]})
        return out


class Tool(Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom", or one of Anthropic's own tools ("web_search_20250305", ...)

    @property
    def offered(self) -> bool:
        return self.input_schema is not None and self.type in (None, "custom")


class ToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self):
        if (self.type == "tool") != (self.name is not None):
            raise invalid("tool_choice.name", "tool_choice of type tool names its tool, and only that type does")
        return self


class SystemBlock(Body):
    type: Literal["text"]
    text: str


class Metadata(Body):
    user_id: str | None = None


class OutputFormat(Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Body):
    format: OutputFormat | None = None  # structured output; `effort` and the rest change nothing here


class MessagesRequest(RequestBody):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # Anthropic's go to 1; vLLM's to 2
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    thinking: dict[str, Any] | None = None  # taken; a reasoning model's thinking is the reasoning parser's
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for output_config.format

    @property
    def _format(self) -> tuple[OutputFormat | None, str]:
        """The structured output's format, and the field that gave it."""
        if self.output_config is not None and self.output_config.format is not None:
            return self.output_config.format, "output_config.format"
        return self.output_format, "output_format"

    def to_chat(self, count_only: bool = False) -> ChatCompletionRequest:
        """The chat request of the same reply (a 400 naming this request's fields for what only the chat rules
        catch). count_only: for /v1/messages/count_tokens, no reply limits."""
        messages: list[dict] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else [
                {"type": "text", "text": b.text} for b in self.system]
            messages.append({"role": "system", "content": system})
        for message in self.messages:
            messages += message.chat_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        output_format, format_field = self._format
        if self.messages[-1].role == "assistant" and messages and messages[-1]["role"] == "assistant" and not \
                messages[-1].get("tool_calls"):  # a prefill: the reply goes on with it, as Anthropic's
            if output_format is not None or (self.tool_choice is not None and self.tool_choice.type in ("any", "tool")):
                # the grammar would hold the reply after the prefill, not the prefill and the reply together
                raise APIError(400, f"A prefill (a last assistant turn) cannot go with {format_field} or a forced "
                                    "tool_choice", param="messages")
            body["continue_final_message"] = True
        if output_format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": output_format.schema_, "strict": True}}
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                            ("stop", self.stop_sequences), ("user", self.metadata and self.metadata.user_id)):
            if value is not None:
                body[name] = value
        offered = [t for t in self.tools or [] if t.offered]
        if offered:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, **({"description": t.description} if t.description else {}),
                "parameters": t.input_schema}} for t in offered]
        choice = self.tool_choice
        if choice is not None and offered:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
                "type": "function", "function": {"name": choice.name}}
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        elif choice is not None and choice.type in ("any", "tool"):
            raise APIError(400, f"tool_choice {choice.type} needs a tool this server can call", param="tool_choice")
        if count_only:
            body.pop("max_tokens")
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise self.in_its_terms(validation_error(RequestValidationError(e.errors()))) from None

    def in_its_terms(self, error: APIError) -> APIError:
        """A chat route's error with `param` as this request names it (a tool by its place among `tools`, which
        holds tools that are not offered too)."""
        places = [i for i, t in enumerate(self.tools or []) if t.offered]
        return _renamed(error, lambda i: places[i] if i < len(places) else i, self._format[1])


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a request without max_tokens."""

    max_tokens: int | None = Field(None, ge=1)


def _renamed(error: APIError, tool_place, format_field: str) -> APIError:
    param = error.param
    if param is None:
        return error
    if param.startswith("response_format"):
        renamed = format_field + param.removeprefix("response_format.json_schema").removeprefix("response_format")
    elif (m := re.fullmatch(r"tools\.(\d+)\.function\.(.+)", param)) is not None:
        field = "input_schema" + m[2].removeprefix("parameters") if m[2].startswith("parameters") else m[2]
        renamed = f"tools.{tool_place(int(m[1]))}.{field}"
    elif param == "stop" or param.startswith("stop."):
        renamed = "stop_sequences" + param.removeprefix("stop")
    elif param.startswith("messages"):
        renamed = "messages"  # indices differ: system comes first, tool results are messages of their own
    elif param == "max_completion_tokens":
        renamed = "max_tokens"
    else:
        return error
    return APIError(error.status, error.message.replace(param, renamed), error.type, renamed, error.code,
                    error.headers)
