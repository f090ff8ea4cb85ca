"""GLM-4 tool-call replies -> OpenAI tool calls, whole (`parse_reply`) or streamed
(`StreamingToolParser`).

GLM-4 calls a tool by answering `{name}\\n{json arguments}` and then `<|observation|>` (a stop
token, so never in the text). Several calls in one reply are `{name}\\n{json}` segments separated
by the special token `<|assistant|>`. The detokenizer writes that token as CALL_MARK (api/chat.py
asks it to), a lone UTF-16 surrogate: no decoded text contains one (UTF-8 cannot encode it) and
no request may (api/json_checks.py rejects them), so the text `<|assistant|>` that a model writes with
ordinary tokens stays text. Plain replies start with "\\n" (the empty metadata slot of
`<|assistant|>{metadata}\\n{content}`), which is never a tool name.

The rule (GLM4.md, as the official demo server decides): a reply is tool calls when every segment's
first line is exactly one of `tool_names` (no stripping: the model writes the name right after
`<|assistant|>`) and the rest of it a JSON object; otherwise the whole reply is plain text. Arguments
are kept as the model wrote them (stripped of surrounding whitespace, not re-serialized).
- A reply cut off by max_tokens (`truncated`) keeps a last call whose arguments are incomplete JSON,
  with the partial arguments (OpenAI sends finish_reason "length" for it); a trailing segment cut
  off while still spelling a tool name is dropped (and under `lenient`, a first one: a forced reply cut
  in its call's name has neither call nor content).
- `lenient` (a forced tool_choice: a grammar wrote the call, but a stop string may have cut its
  JSON): segments are calls while their first line is a tool name, whatever their arguments;
  the first segment that is not, and everything after it, is content.
- `freeform` tools (the Responses API's custom tools) take any text as their input: a segment whose
  first line is one of them is a call, its rest the input as written.
- `one_call` (`parallel_tool_calls: false`, `opening_call`): a reply whose first segment is a whole call
  is that call; what follows its separator is dropped, a cut by max_tokens included, as if the model had
  stopped there (streamed, `done` says so as soon as the separator comes, and the API ends the reply).
  A reply that does not open with a call is decided by the rule as it stands.

Streamed, a reply whose first line cannot be a tool name streams as content at once; one whose
first line is a tool name is held to its end and then decided by the same rule, so a streamed
reply and a whole one always agree and a client never gets a call the rule would not make. GLM-4
stops right after a call (`<|observation|>`), so holding it costs no time to the complete call;
its arguments arrive in one fragment. But for `lenient` (each segment is a call whatever follows its
name): each call starts once its name line is whole and its arguments stream as they come (whitespace
at their ends held back, as the whole reply strips it); from the first segment that cannot be a call,
the rest is held and decided at the end.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

CALL_MARK = "\udfff"  # the `<|assistant|>` token between calls, as the detokenizer writes it (above)
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it, stripped


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int  # 0, 1, ... within the reply
    id: str
    name: str


@dataclass
class ToolArgsDelta:
    index: int
    text: str  # never empty: a call's arguments, whole (or, for a forced call, the next piece of them)


Event = ContentDelta | ToolCallStart | ToolArgsDelta


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def parse_reply(text: str, tool_names: set[str], *, truncated: bool = False, lenient: bool = False,
                freeform: frozenset[str] = frozenset()) -> tuple[list[ToolCall], str]:
    """A whole reply -> (its tool calls, its content) by the rule of the module docstring; a
    reply with no calls is all content."""
    segments = text.split(CALL_MARK)
    calls = []
    for k, segment in enumerate(segments):
        is_last = k == len(segments) - 1
        name, newline, rest = segment.partition("\n")
        if is_last and not newline and (k > 0 or lenient):
            # Ended right after a separator, or (cut off) while spelling the next name; forced, the first one too.
            if segment == "" or (truncated and _could_be_name(segment, tool_names)):
                break
        arguments = rest.strip()
        valid = lenient or name in freeform or _is_json_object(arguments) or (truncated and is_last)
        if not (newline and name in tool_names and valid):
            return (calls, "".join(segments[k:])) if lenient else ([], text.replace(CALL_MARK, ""))
        calls.append(ToolCall(new_call_id(), name, arguments))
    return calls, ""


def opening_call(text: str, tool_names: set[str], *, lenient: bool = False,
                 freeform: frozenset[str] = frozenset()) -> list[ToolCall]:
    """`one_call`'s rule: the call a reply opens with when a separator follows it, whole; else []."""
    first, mark, _ = text.partition(CALL_MARK)
    return parse_reply(first, tool_names, lenient=lenient, freeform=freeform)[0] if mark else []


class StreamingToolParser:
    """Feed decoded text deltas of one reply; get content / tool-call events as early as the
    rule allows (module docstring). `calls` holds the reply's calls once decided."""

    def __init__(self, tool_names: set[str], *, lenient: bool = False, freeform: frozenset[str] = frozenset(),
                 one_call: bool = False):
        self.tool_names = frozenset(tool_names)
        self.lenient = lenient
        self.freeform = freeform
        self.one_call = one_call
        # one_call: the opening call is whole and a separator came, so nothing after (a cut included) can change
        # the reply
        self.done = False
        self.calls: list[ToolCall] = []
        # "name": the first line may still be a tool name (held); "call": it is one, the reply is
        # held to its end; "content": plain text, streamed as it comes.
        self._mode = "name"
        self._held = ""
        self._finished = False
        # lenient: the calls streamed as they come (started, in order); the segment after the last one's
        # separator while its name line is held; whether the last started one's arguments are still coming,
        # whether they began, and the whitespace after what was sent; and whether a segment that is no call
        # came (the rest is then held to the end, as parse_reply makes it content)
        self._started: list[ToolCallStart] = []
        self._segment = ""
        self._in_args = False
        self._args_begun = False
        self._trailing = ""
        self._no_more_calls = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        events = self._feed(delta)
        if self.one_call and self._mode == "call" and CALL_MARK in delta and not self.done:
            self.done = bool(opening_call(self._held, self.tool_names, lenient=self.lenient, freeform=self.freeform))
        return events

    def _feed(self, delta: str) -> list[Event]:
        if self._mode == "content":
            return _content(delta)
        self._held += delta
        if self._mode == "name":
            line, newline, rest = self._held.partition("\n")
            if newline and line in self.tool_names:
                self._mode = "call"
                if self.lenient:
                    return self._start(line) + self._lenient(rest)
            elif newline or not _could_be_name(line, self.tool_names):
                self._mode = "content"
                held, self._held = self._held, ""
                return _content(held)
        elif self.lenient:
            return self._lenient(delta)
        return []

    def _lenient(self, text: str) -> list[Event]:
        """lenient: each segment is a call once its name line is a tool name, so each call starts then and its
        arguments stream as they come; the first segment that cannot be a call ends that (parse_reply's rule)."""
        events: list[Event] = []
        while text and not self._no_more_calls:
            if self._in_args:
                part, mark, text = text.partition(CALL_MARK)
                events += self._arguments(part)
                self._in_args = not mark
                if mark and self.one_call:  # the opening call is the reply's one: the rest is dropped
                    self._no_more_calls = True
                continue
            self._segment += text
            line, newline, rest = self._segment.partition("\n")
            if CALL_MARK in line or (newline and line not in self.tool_names) or \
                    not _could_be_name(line, self.tool_names):
                self._no_more_calls = True
            elif newline:
                events += self._start(line)
                text = rest
            else:
                text = ""
        return events

    def _start(self, name: str) -> list[Event]:
        self._started.append(ToolCallStart(len(self._started), new_call_id(), name))
        self._segment, self._in_args, self._args_begun, self._trailing = "", True, False, ""
        return [self._started[-1]]

    def _arguments(self, text: str) -> list[Event]:
        """The current call's arguments in `text`, as far as they are sure: stripped as parse_reply strips them."""
        if not self._args_begun:
            text = text.lstrip()
            self._args_begun = bool(text)
        sure = (self._trailing + text).rstrip()
        self._trailing = (self._trailing + text)[len(sure):]
        return [ToolArgsDelta(self._started[-1].index, sure)] if sure else []

    def finish(self, truncated: bool = False) -> list[Event]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._mode == "content":
            return []
        if self.done:
            self.calls, content = opening_call(self._held, self.tool_names, lenient=self.lenient,
                                               freeform=self.freeform), ""
        else:
            self.calls, content = parse_reply(self._held, self.tool_names, truncated=truncated, lenient=self.lenient,
                                              freeform=self.freeform)
        events: list[Event] = []
        for index, call in enumerate(self.calls):
            if index < len(self._started):  # sent already, as parse_reply makes it
                call.id = self._started[index].id
                continue
            events.append(ToolCallStart(index, call.id, call.name))
            if call.arguments:
                events.append(ToolArgsDelta(index, call.arguments))
        return events + _content(content)


def _content(text: str) -> list[Event]:
    text = text.replace(CALL_MARK, "")
    return [ContentDelta(text)] if text else []


def _could_be_name(prefix: str, tool_names) -> bool:
    return any(name.startswith(prefix) for name in tool_names)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
