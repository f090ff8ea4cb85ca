"""The tools of a Responses API request, as the model is offered them.

Clients such as Codex send, beside function tools, tools the model cannot call here: those OpenAI's
platform runs (web_search, file_search, code_interpreter, image_generation, mcp, ...) and those with
call items of their own (local_shell, shell, apply_patch, computer_use_preview). They are left out of the
prompt (logged once a set). What is offered:
- a function, as it is;
- a `custom` tool (free-form text input, such as Codex's apply_patch) as a function of one string
  argument, `input`; the model may also write the input as it is after the name (its call's rest is then
  taken whole), as a tool whose description says "do not wrap it in JSON" asks. Its input grammar, if
  any, is not enforced;
- a `namespace`'s functions and custom tools, each under `{namespace}.{name}`, so that two namespaces
  may both have a `search`; their calls carry the tool's own name and the namespace.
`allowed_tools` narrows what is offered.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag

from .body import Body
from .errors import invalid_request
from .messages import MAX_TOOL_NAME, FunctionDef, ToolName

log = logging.getLogger("glm4serve.api")

CUSTOM_INPUT = "input"  # a custom tool's one argument, when it is offered as a function
CUSTOM_PARAMETERS = {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}}, "required": [CUSTOM_INPUT]}


class FunctionTool(FunctionDef):
    """The Responses API's function tool: the chat tool's `function` fields, flat."""

    type: Literal["function"]

    def as_function(self) -> dict:
        return {k: v for k, v in self.as_given().items() if k != "type"}


class CustomTool(Body):
    """A tool whose input is free-form text."""

    type: Literal["custom"]
    name: ToolName
    description: str | None = None
    format: dict[str, Any] | None = None  # its input's grammar: not enforced

    def as_function(self) -> dict:
        described = {"description": self.description} if self.description is not None else {}
        return {"name": self.name, **described, "parameters": CUSTOM_PARAMETERS}


class NamespaceTool(Body):
    """Functions and custom tools grouped under a name, which their calls carry."""

    type: Literal["namespace"]
    name: ToolName
    description: str | None = None
    tools: list[Annotated[FunctionTool | CustomTool, Field(discriminator="type")]]


class OtherTool(Body):
    """A tool the model cannot call here: left out of the prompt, echoed in the response as sent."""

    model_config = ConfigDict(extra="allow")  # merged with Body's
    type: str


def _tool_tag(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    return f"tool[{kind if kind in ('function', 'custom', 'namespace') else 'other'}]"


ResponseTool = Annotated[
    Union[
        Annotated[FunctionTool, Tag("tool[function]")],
        Annotated[CustomTool, Tag("tool[custom]")],
        Annotated[NamespaceTool, Tag("tool[namespace]")],
        Annotated[OtherTool, Tag("tool[other]")],
    ],
    Discriminator(_tool_tag),
]


@dataclass(frozen=True)
class OfferedTool:
    """A tool as the model is offered it: a function, which may stand for a custom tool, in a namespace."""

    function: dict  # the chat tool's `function`, under the name the model sees
    custom: bool
    call_name: str  # the tool's own name, which its calls carry
    namespace: str | None
    source: str  # where the request has it: "tools.3", or "tools.3.tools.1" in a namespace

    @property
    def name(self) -> str:
        return self.function["name"]


def model_name_of(name: str, namespace: str | None) -> str:
    """The name the model sees a tool by."""
    return f"{namespace}.{name}" if namespace else name


class NamedFunctionChoice(Body):
    type: Literal["function", "custom"]
    name: str


class AllowedTool(Body):
    type: str
    name: str | None = None


class AllowedToolsChoice(Body):
    """Only these of the tools may be called: "auto" lets the reply be text, "required" makes it a call."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedTool]

    def narrow(self, offered: list[OfferedTool]) -> list[OfferedTool]:
        """The offered tools these name (a namespace names all of its own); a 400 for a name not in tools."""
        allowed: set[str] = set()
        for k, entry in enumerate(self.tools):
            param = f"tool_choice.tools.{k}"
            if entry.type not in ("namespace", "function", "custom"):
                continue  # a tool this server cannot run: it is not offered anyway
            if entry.name is None:
                raise invalid_request(f"{param} names no {entry.type}", param)
            if entry.type == "namespace":
                named = {t.name for t in offered if t.namespace == entry.name}
                if not named:
                    raise invalid_request(f"{param} names {entry.name!r}, which is no namespace of tools", param)
            else:
                named = {find_tool(entry.name, entry.type == "custom", offered, param).name}
            allowed |= named
        return [t for t in offered if t.name in allowed]


ToolChoice = Literal["none", "auto", "required"] | NamedFunctionChoice | AllowedToolsChoice


def offer(tools: list | None, choice: ToolChoice | None) -> list[OfferedTool]:
    """The tools the model is offered, in order: namespaces' flattened, the others' left out (logged)."""
    offered, left_out = [], set()
    for i, tool in enumerate(tools or []):
        if isinstance(tool, NamespaceTool):
            offered += [_offered(t, f"tools.{i}.tools.{j}", tool.name) for j, t in enumerate(tool.tools)]
        elif isinstance(tool, (FunctionTool, CustomTool)):
            offered.append(_offered(tool, f"tools.{i}", None))
        else:
            left_out.add(tool.type)
    if left_out:
        _note_left_out(frozenset(left_out))
    return choice.narrow(offered) if isinstance(choice, AllowedToolsChoice) else offered


def _offered(tool: FunctionTool | CustomTool, source: str, namespace: str | None) -> OfferedTool:
    name = model_name_of(tool.name, namespace)
    if len(name) > MAX_TOOL_NAME:
        raise invalid_request(f"{source}.name: the tool's name with its namespace's, {name!r}, is longer than "
                              f"{MAX_TOOL_NAME} characters", f"{source}.name")
    return OfferedTool({**tool.as_function(), "name": name}, isinstance(tool, CustomTool), tool.name, namespace,
                       source)


def find_tool(name: str, custom: bool, offered: list[OfferedTool], param: str) -> OfferedTool:
    """The offered tool of this kind a tool_choice names: by the name the model sees it by, else by its own name
    when one tool alone has it; a 400 when none has it, or several."""
    kind = [t for t in offered if t.custom == custom]
    exact = [t for t in kind if t.name == name]
    found = exact or [t for t in kind if t.call_name == name]
    what = "custom tool" if custom else "function"
    if not found:
        raise invalid_request(f"{param} names {name!r}, which is no {what} of tools", param)
    if len(found) > 1:
        raise invalid_request(f"{param} names {name!r}, which {len(found)} namespaces have: name it as "
                              f"{found[0].name!r}", param)
    return found[0]


def forced_name(choice: NamedFunctionChoice, offered: list[OfferedTool]) -> str:
    """The name the model sees the tool a named tool_choice forces by."""
    return find_tool(choice.name, choice.type == "custom", offered, "tool_choice").name


@functools.lru_cache(maxsize=64)
def _note_left_out(kinds: frozenset[str]) -> None:
    """Logged once a set: clients such as Codex send the same tools with every request."""
    log.info("responses: tools of types %s are left out of the prompt: this server cannot run them", sorted(kinds))
