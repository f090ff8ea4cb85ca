"""The parts of a chat request: its messages, the tools it offers and how it chooses among them, its stream
options."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from glm4serve.chat.template import PART_SEPARATOR

from .body import Body
from .json_checks import invalid


# a media part of chat's, the Responses API's or Anthropic's content, and what it is
MEDIA_PARTS = {"image_url": "an image", "input_image": "an image", "input_audio": "audio", "file": "a file",
               "input_file": "a file", "video_url": "a video", "image": "an image", "document": "a document",
               "search_result": "a search result", "container_upload": "a file"}


def part_text(kind: str, text: str | None, refusal: str | None, param: str) -> str:
    """The text a content part stands for in the prompt. Media: a line saying it was left out, since GLM-4
    reads text only; the model is told what it cannot see rather than the request refused (a client keeps
    the media in every later turn of the conversation). A refusal, an earlier reply's: its text."""
    if kind in MEDIA_PARTS:
        return f"[{MEDIA_PARTS[kind]} left out: this model reads text only]"
    if kind == "refusal":
        if refusal is None:
            raise invalid(param, "a refusal part needs its refusal")
        return refusal
    if text is None:
        raise invalid(param, f"a {kind} part needs its text")
    return text


class TextPart(Body):
    """A part of a message's content: text, an earlier reply's refusal, or media (part_text)."""

    type: Literal["text", "refusal", "image_url", "input_audio", "file", "video_url"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _its_text(self) -> "TextPart":
        self.text = part_text(self.type, self.text, self.refusal, "messages")
        return self


class FunctionCall(Body):
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    # "function": OpenAI's older name for a tool's result; "observation": GLM-4's own
    role: Literal["system", "developer", "user", "assistant", "tool", "function", "observation"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise invalid("messages", "an assistant message needs content or tool_calls")
        elif self.content is None:
            raise invalid("messages", f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise invalid("messages", "only assistant messages may carry tool_calls")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return PART_SEPARATOR.join(p.text for p in self.content)
        return self.content

    def for_template(self) -> dict:
        """A plain dict for the chat template: text parts joined, developer treated as system."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text() or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


# ---- tools ----------------------------------------------------------------------------------

MAX_TOOL_NAME = 64  # OpenAI's limit on a tool's name
ToolName = Annotated[str, Field(min_length=1, max_length=MAX_TOOL_NAME, pattern=r"^[A-Za-z0-9_.\-]+$")]


class FunctionDef(Body):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    _given: dict | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_as_given(cls, data: Any, handler) -> "FunctionDef":
        function = handler(data)
        if isinstance(data, dict):
            function._given = data
        return function

    def as_given(self) -> dict:
        """The function as the client wrote it (its keys' order, nulls, keys of its own): GLM-4's
        template dumps it into the prompt as it comes, as transformers renders a client's tools."""
        return self._given if self._given is not None else self.model_dump(exclude_none=True)


class Tool(Body):
    type: Literal["function"] = "function"
    function: FunctionDef

    def as_given(self) -> dict:
        return {"type": "function", "function": self.function.as_given()}


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(Body):
    include_usage: bool | None = None  # unsent: off (OpenAI's), but on for continuous_usage_stats (vLLM's)
    continuous_usage_stats: bool = False  # vLLM: with include_usage, every chunk carries its choice's usage so far
