"""OpenAI chat messages -> a GLM-4 prompt string.

Two steps: `to_glm_turns` turns OpenAI messages into GLM-4 turns (role system | user | assistant |
observation, `metadata`, string `content`), then a jinja chat template renders them: the
checkpoint's own template when the caller passes one (the faithful choice), otherwise our
built-in `glm4_template.jinja`, which renders the glm-4-9b-chat format.

Templates are rendered the way transformers' `apply_chat_template` renders them (sandboxed,
trim_blocks + lstrip_blocks, its `tojson` / `raise_exception` / `strftime_now`), because that is
how the published templates were written and checked.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATE_PATH = Path(__file__).with_name("glm4_template.jinja")
# Text content parts are separate blocks of text: "\n" between them, as vLLM joins them.
PART_SEPARATOR = "\n"

# OpenAI role -> GLM-4 role. "developer" is OpenAI's newer name for system; "function" is the
# legacy name for a tool result, "observation" GLM-4's own.
_ROLE_MAP = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "function": "observation",
    "observation": "observation",
}

# Variables render_prompt itself sets; template_kwargs may not override them.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})

# glm-4-9b-chat's template reads tools from a message (`item['tools']`); 0414-style templates
# read the top-level `tools` variable. A subscript or attribute `tools` on some object means the
# former.
_MESSAGE_TOOLS_RE = re.compile(r"""\w\s*(\[\s*['"]tools['"]\s*\]|\.tools\b|\.get\(\s*['"]tools['"])""")


class TemplateError(ValueError):
    """The messages, tools or template cannot be rendered into a prompt."""


def render_prompt(
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
    continue_final_message: bool = False,
) -> str:
    """Render OpenAI chat `messages` (+ OpenAI function `tools`) into a GLM-4 prompt string.

    `chat_template` None = our built-in glm-4-9b-chat format. `continue_final_message`: the prompt
    ends with the final message's text, for the model to go on with it (a reply begun for it).
    Raises TemplateError on bad input.
    """
    template_source = chat_template if chat_template is not None else builtin_template()
    if continue_final_message and messages and isinstance(messages[-1], dict) and messages[-1].get("tool_calls"):
        # the reply goes on with the final message's text: its calls, which would follow that text, go
        messages = [*messages[:-1], {k: v for k, v in messages[-1].items() if k != "tool_calls"}]
    turns = to_glm_turns(messages)
    tools = _check_tools(tools)
    extra = dict(template_kwargs or {})
    clash = _RESERVED_VARIABLES & extra.keys()
    if clash:
        raise TemplateError(f"template_kwargs may not set {sorted(clash)}")

    if tools and template_reads_message_tools(template_source):
        # The glm-4-9b-chat way: a system item carrying `tools` (and no content of its own)
        # renders the tool system turn; put it first, as the official demo server does.
        turns.insert(0, {"role": "system", "metadata": "", "content": "", "tools": tools})

    template = _compile(template_source)
    try:
        text = template.render(messages=turns, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox violations
        raise TemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError) as e:
        # bad data the template chokes on, or a template (--chat-template) that divides by zero or recurses
        raise TemplateError(f"chat template failed on this input: {e!r}") from e
    return _cut_after_final_message(text, messages) if continue_final_message else text


def _cut_after_final_message(rendered: str, messages: list[dict]) -> str:
    """The prompt cut right after the final message's text, as transformers' continue_final_message
    cuts it: whatever the template puts after a message (an end-of-turn token) must not follow."""
    final = _content_text(messages[-1].get("content"), len(messages) - 1) if messages else ""
    if not final.strip():
        raise TemplateError("continue_final_message needs a final message with text to continue")
    at = rendered.rfind(final.strip())
    if at < 0:
        raise TemplateError("continue_final_message: the chat template does not render the final message's text")
    kept = final.lstrip()  # the template may have trimmed the text's trailing whitespace
    return rendered[: at + (len(kept) if rendered.startswith(kept, at) else len(final.strip()))]


def render_prompt_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """render_prompt, then encode with special-token text allowed (the prompt already carries
    `[gMASK]<sop>` and role tokens, so nothing may be added)."""
    return tokenizer.encode(render_prompt(messages, **kwargs), allow_special=True)


def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: a file holding a template, or a template itself (one with a brace or a
    line break in it); TemplateError when it is neither, or does not parse."""
    try:
        source = Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: ~user of no such user
        if not any(c in value for c in "{}\n"):
            raise TemplateError(f"chat template {value!r} looks like a file, but cannot be read: {e}") from None
        source = value
    _compile(source)
    return source


@lru_cache(maxsize=1)
def builtin_template() -> str:
    return BUILTIN_TEMPLATE_PATH.read_text(encoding="utf-8")


def template_reads_message_tools(template_source: str) -> bool:
    """True when the template takes tools from a message item (glm-4-9b-chat), not `tools`."""
    return _MESSAGE_TOOLS_RE.search(template_source) is not None


def to_glm_turns(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> GLM-4 turns: dicts with role, metadata ("" or a tool name), content.

    A tool result becomes an `observation` turn; each tool call of an assistant message becomes
    its own assistant turn with metadata = function name and content = the arguments JSON
    (after the message's text content, if it has any).
    """
    if not isinstance(messages, list):
        raise TemplateError("messages must be a list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"messages[{i}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLE_MAP:
            raise TemplateError(f"messages[{i}]: unknown role {role!r} (expected one of {sorted(_ROLE_MAP)})")
        content = _content_text(message.get("content"), i)
        tool_calls = message.get("tool_calls") if role == "assistant" else None
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise TemplateError(f"messages[{i}]: tool_calls must be a list")
        # An assistant message that only carries tool calls has no text turn of its own.
        if content or not tool_calls:
            turns.append({"role": _ROLE_MAP[role], "metadata": "", "content": content})
        for call in tool_calls or []:
            name, arguments = _tool_call_parts(call, i)
            turns.append({"role": "assistant", "metadata": name, "content": arguments})
    return turns


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(f"messages[{i}]: only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return PART_SEPARATOR.join(texts)
    raise TemplateError(f"messages[{i}]: content must be a string, null or a list of text parts")


def _tool_call_parts(call: Any, i: int) -> tuple[str, str]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise TemplateError(f"messages[{i}]: each tool call needs function.name")
    arguments = function.get("arguments")
    # no arguments at all is GLM-4's `{}`: the template skips an empty turn, and the call's name with it
    if arguments is None or arguments == "":
        arguments = "{}"
    elif not isinstance(arguments, str):  # some clients send an object instead of a JSON string
        arguments = json.dumps(arguments, ensure_ascii=False)
    return name, arguments


def _check_tools(tools: Any) -> list[dict] | None:
    if not tools:  # None or []: no tool turn at all
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TemplateError("tools must be a list of objects")
    return tools


# --- the jinja environment, as transformers sets it up for chat templates ---


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes and has no ensure_ascii; chat templates expect json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some
    templates; for serving it only has to parse and render its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # Like transformers: no underscore attributes, so a template cannot reach Python internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")


@lru_cache(maxsize=8)
def _compile(template_source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template_source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: line {e.lineno}: {e.message}") from e
