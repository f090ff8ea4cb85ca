"""Request body of POST /v1/responses, and the chat completion request it stands for.

The Responses API is OpenAI's newer shape of the same exchange, the one the Agents SDK and
Codex speak: `input` items instead of messages, flat function tools, `text.format` instead of
`response_format`, `max_output_tokens`. A request becomes a ChatCompletionRequest, so a reply
takes the chat route's one path (template, tool parsing, grammars, limits).

A reply is stored unless `store` is false (response_store.py), and `previous_response_id`
continues from a stored one: its context items come before this request's `input`, while its
`instructions` and tools do not carry over (as OpenAI's API does). `conversation` continues and
extends a conversation the server keeps instead (conversations.py). With either, `input` may be left out.
An `item_reference` input item stands for the item of that id in a stored response (the Vercel AI SDK sends
its earlier replies so); one naming an item of the context continued from is dropped, as it is there.
`background` runs the reply as the server's own task (background.py); a stored `prompt` is refused with a
400. `reasoning` and `include` values other than output logprobs are accepted and have no effect: a reasoning
model's thinking (GLM-Z1) is split off by the server's reasoning parser, not by the request, and returned as a
reasoning item; reasoning items sent back in `input` are dropped. `truncation: "auto"` is taken, but drops
nothing: input over the context is a 400 either way.

Tools are offered as responses_tools.py says; call items of tools this server cannot offer, in a
conversation sent back, are dropped, as reasoning items are. Images, files and audio in the input become
a line of text saying what was left out: GLM-4 reads text only.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from glm4serve.engine.types import MAX_TOP_LOGPROBS

from .body import Body, Metadata, RequestBody, Seed
from .errors import APIError, invalid_request
from .json_checks import invalid
from .messages import part_text
from .responses_tools import (
    CUSTOM_INPUT,
    NamedFunctionChoice,
    OfferedTool,
    ResponseTool,
    ToolChoice,
    forced_name,
    model_name_of,
    offer,
)
from .schemas import ChatCompletionRequest

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# items of tools this server cannot offer (hosted by OpenAI, or with call items of their own): dropped
FOREIGN_CALL_ITEMS = frozenset({
    "web_search_call", "file_search_call", "image_generation_call", "code_interpreter_call", "computer_call",
    "computer_call_output", "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
    "mcp_approval_response", "tool_search_call", "tool_search_output"})


# ---- input items ----------------------------------------------------------------------------

class TextPart(Body):
    """A part of a message's content: text (input_text; output_text or refusal, an earlier reply's), or media,
    which stands in the prompt as a line saying it was left out (part_text)."""

    type: Literal["input_text", "output_text", "refusal", "input_image", "input_file", "input_audio"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _its_text(self) -> "TextPart":
        self.text = part_text(self.type, self.text, self.refusal, "input")
        return self

    @property
    def as_text_part(self) -> dict:
        """How the conversation keeps it: as the model saw it."""
        kind = self.type if self.type in ("input_text", "output_text") else (
            "output_text" if self.type == "refusal" else "input_text")
        return {"type": kind, "text": self.text, **({"annotations": []} if kind == "output_text" else {})}


def _chat_content(content: str | list[TextPart]) -> str | list[dict]:
    """As chat content: parts stay parts, so they are joined by the chat route's one rule."""
    return content if isinstance(content, str) else [{"type": "text", "text": p.text} for p in content]


class InputMessage(Body):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    @model_validator(mode="after")
    def _output_text_is_a_replys(self) -> "InputMessage":
        if self.role != "assistant" and not isinstance(self.content, str) and any(
                p.type in ("output_text", "refusal") for p in self.content):
            raise invalid("input", f"a {self.role} message's parts are input_text; output_text is an assistant's")
        return self


class _CallItem(Body):
    """A call the model made earlier, sent back with the conversation."""

    id: str | None = None
    call_id: str
    name: str
    namespace: str | None = None


class _CallOutputItem(Body):
    """A call's result."""

    id: str | None = None
    call_id: str
    output: str | list[TextPart]


class FunctionCallItem(_CallItem):
    type: Literal["function_call"]
    arguments: str


class FunctionCallOutputItem(_CallOutputItem):
    type: Literal["function_call_output"]


class CustomToolCallItem(_CallItem):
    """To the model, a call of the function the custom tool was offered as."""

    type: Literal["custom_tool_call"]
    input: str


class CustomToolCallOutputItem(_CallOutputItem):
    type: Literal["custom_tool_call_output"]


class ItemReference(Body):
    """An item of the context the request continues from, or of a stored response, named by its id: it stands
    for that item (responses.py puts the item in its place before anything reads the input)."""

    type: Literal["item_reference"]
    id: str


class DroppedItem(Body):
    """Another model's reasoning, or a call of a tool this server does not offer (FOREIGN_CALL_ITEMS), sent
    back by a client that switched models: dropped."""

    type: str


class UnsupportedItem(Body):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        raise invalid("input", f"input items of type {kind!r} are not supported: this server takes message, "
                               f"function_call, custom_tool_call, their output items and item_reference")


_ITEM_TYPES = ("message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
               "item_reference")


def _item_tag(item: Any) -> str:
    # Tags are written `item[...]`: error paths leave out a part with a bracket (errors.py), so a
    # bad field is `input.0.content`, not `input.0.message.content`.
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    if kind == "reasoning" or (isinstance(kind, str) and kind in FOREIGN_CALL_ITEMS):
        return "item[dropped]"
    return f"item[{kind if kind in _ITEM_TYPES else 'unsupported'}]"


InputItem = Annotated[
    Union[
        Annotated[InputMessage, Tag("item[message]")],
        Annotated[FunctionCallItem, Tag("item[function_call]")],
        Annotated[FunctionCallOutputItem, Tag("item[function_call_output]")],
        Annotated[CustomToolCallItem, Tag("item[custom_tool_call]")],
        Annotated[CustomToolCallOutputItem, Tag("item[custom_tool_call_output]")],
        Annotated[ItemReference, Tag("item[item_reference]")],
        Annotated[DroppedItem, Tag("item[dropped]")],
        Annotated[UnsupportedItem, Tag("item[unsupported]")],
    ],
    Discriminator(_item_tag),
]
_ITEM_LIST = TypeAdapter(list[InputItem])


def new_id(prefix: str) -> str:
    """An id for an item or object the server makes ("msg_...", "resp_...")."""
    return f"{prefix}_{uuid.uuid4().hex}"


def parse_items(items: list[dict]) -> list:
    """Stored items (item_resources' and output items) as input items again."""
    return _ITEM_LIST.validate_python(items)


def item_resources(items: list) -> list[dict]:
    """Input items as the API lists and stores them: each with an id (the client's, else
    a new one) and a status, as the model saw them; dropped items, which play no part, are left out."""
    prefixes = {FunctionCallItem: "fc", FunctionCallOutputItem: "fco", CustomToolCallItem: "ctc",
                CustomToolCallOutputItem: "ctco"}
    out = []
    for item in items:
        if isinstance(item, InputMessage):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = [TextPart(type=kind, text=item.content)] if isinstance(item.content, str) else item.content
            out.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                        "content": [p.as_text_part for p in parts], "status": "completed"})
        elif type(item) in prefixes:
            fields = item.model_dump(exclude={"id"}, exclude_none=True)
            if not isinstance(getattr(item, "output", ""), str):
                fields["output"] = [p.as_text_part for p in item.output]
            item_id = item.id or new_id(prefixes[type(item)])
            out.append({"id": item_id, "type": item.type, **fields, "status": "completed"})
    return out


# ---- tools and formats ----------------------------------------------------------------------


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given_and_valid(self):
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                raise invalid("text.format", "text.format of type json_schema needs a name and a schema")
        return self  # the schema is checked with the chat request it becomes (prepare_chat)

    def as_response_format(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name, "description": self.description,
                                                       "schema": self.schema_, "strict": self.strict}}


class TextConfig(Body):
    format: TextFormat | None = None


# ---- the request ----------------------------------------------------------------------------


class ConversationRef(Body):
    id: str


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[InputItem] = []
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[ResponseTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None
    metadata: Metadata | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    store: bool | None = None  # None: stored, as OpenAI's default
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None  # a prompt template stored on OpenAI's platform: refused
    # vLLM's extensions, passed to the chat request when sent
    seed: Seed | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: int | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _callable_tool_choice(cls, data: Any) -> Any:
        choice = data.get("tool_choice") if isinstance(data, dict) else None
        if isinstance(choice, dict) and choice.get("type") not in ("function", "custom", "allowed_tools", None):
            raise invalid("tool_choice", f"tool_choice of type {choice.get('type')!r} is not supported: this "
                                         "server calls function and custom tools")
        return data

    @model_validator(mode="after")
    def _stateless(self):
        if self.conversation is not None and self.previous_response_id is not None:
            raise invalid("conversation", "conversation and previous_response_id cannot both be given")
        if self.background and self.store is False:
            raise invalid("background", "a background response is stored: background requires store to be true")
        if self.prompt is not None:
            raise invalid("prompt", "stored prompt templates are not supported: send the instructions and input")
        if self.input == [] and self.conversation is None and self.previous_response_id is None:
            raise invalid("input", "input must not be empty (it may be left out only to continue a conversation "
                                   "or a previous response)")
        return self

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ()) or bool(self.top_logprobs)

    @property
    def input_items(self) -> list:
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def messages(self, history: list = ()) -> list[dict]:
        """Chat messages: the instructions as a system message, then one message per item of
        `history` (a previous response's context, parsed) and of the input (a function call is
        an assistant message with that call: GLM-4 gives each call its own assistant turn anyway; a custom
        tool's call has its input as written, a namespaced tool's call the name the model sees it by)."""
        out: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for item in [*history, *self.input_items]:
            if isinstance(item, InputMessage):
                out.append({"role": item.role, "content": _chat_content(item.content)})
            elif isinstance(item, (FunctionCallItem, CustomToolCallItem)):
                if isinstance(item, CustomToolCallItem):  # as written; empty, as its one argument
                    arguments = item.input or json.dumps({CUSTOM_INPUT: ""})
                else:
                    arguments = item.arguments
                call = {"id": item.call_id, "function": {"name": model_name_of(item.name, item.namespace),
                                                         "arguments": arguments}}
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, (FunctionCallOutputItem, CustomToolCallOutputItem)):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _chat_content(item.output)})
        return out

    def to_chat(self, history: list = (), offered: list[OfferedTool] | None = None) -> ChatCompletionRequest:
        """The chat request of the same reply, with the `offered` tools (by default offer()'s); raises
        pydantic's ValidationError for what only the chat rules catch."""
        messages = self.messages(history)
        if not messages:
            raise APIError(400, "input has no message or function call item (reasoning items are dropped)",
                           "invalid_request_error", "input")
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for name in ("temperature", "top_p", "parallel_tool_calls", "user", "seed", "top_k", "min_p",
                     "repetition_penalty", "priority", "return_tokens_as_token_ids", "cache_salt"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        # `tools: []` is no tools (the Agents SDK sends it), and so is "auto", "required" or "none" without
        # tools, as on the chat route
        offered = offer(self.tools, self.tool_choice) if offered is None else offered
        if offered:
            body["tools"] = [{"type": "function", "function": t.function} for t in offered]
        choice = getattr(self.tool_choice, "mode", self.tool_choice)  # allowed_tools: its mode
        if isinstance(choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": forced_name(choice, offered)}}
        elif choice == "required" and not offered and self.tools:
            raise invalid_request("tool_choice is required, but this server can call none of tools", "tool_choice")
        elif choice is not None and offered:
            body["tool_choice"] = choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self.text.format.as_response_format()
        if self.wants_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        return ChatCompletionRequest.model_validate(body)


def in_responses_terms(error: APIError, offered: list[OfferedTool] = ()) -> APIError:
    """A chat route's error with `param` named as the Responses request names it, in its message too (a tool
    by where the request has it, of the `offered` tools)."""
    param = error.param
    if param is None:
        return error
    if param.startswith("messages"):
        param = "input"  # indices differ: instructions come first, reasoning items are dropped
    elif param.startswith("response_format.json_schema.schema"):
        param = "text.format.schema" + param.removeprefix("response_format.json_schema.schema")
    elif param.startswith("response_format"):
        param = "text.format"
    elif param in ("max_tokens", "max_completion_tokens"):
        param = "max_output_tokens"
    elif (m := re.fullmatch(r"tools\.(\d+)\.function\.(.+)", param)) is not None:
        index = int(m[1])
        param = f"{offered[index].source if index < len(offered) else f'tools.{index}'}.{m[2]}"
    if param == error.param:
        return error
    message = error.message.replace(error.param, param)
    return APIError(error.status, message, error.type, param, error.code, error.headers)
