"""GLM-4 tool-call replies -> OpenAI tool calls, whole (`parse_tool_calls`) or streamed
(`StreamingToolParser`).

GLM-4 calls a tool by answering `{name}\\n{json arguments}` and then `<|observation|>` (a stop
token, so never in the text). Several calls in one reply are `{name}\\n{json}` segments separated
by the special token text `<|assistant|>` (the API decodes with skip_special_tokens=False when
tools are given, so the separator is visible). Plain replies start with "\\n" (the empty
metadata slot of `<|assistant|>{metadata}\\n{content}`), which is never a tool name.

Rules shared by both parsers:
- A segment is a call when its first line is exactly one of `tool_names` (no stripping: the
  model writes the name right after `<|assistant|>`). Its arguments are the rest of the segment,
  stripped of surrounding whitespace, kept as the model wrote them (not re-serialized), so the
  streamed fragments and the whole-reply string are the same text.
- A reply whose first segment is not a call is plain text, passed through verbatim, including
  any `<|assistant|>` text in it (nothing is lost; the caller may clean it).
- A reply cut off by max_tokens (`truncated=True`) keeps a call whose arguments are incomplete
  JSON, with the partial arguments (OpenAI sends finish_reason "length" for it); a trailing
  segment cut off while still spelling a tool name is dropped.

Where they differ (the streaming parser cannot take back what it has sent):
- `parse_tool_calls` is strict: unless every segment is a call with a JSON-object argument
  (except a truncated last one, see above), the whole reply is plain text (None), so a client
  never gets arguments it cannot json.loads.
- `StreamingToolParser` commits to a call as soon as a first line is a tool name and streams
  the arguments as they come. If the reply then ends (not truncated) with arguments that are not
  a JSON object, the call stays a call with those arguments. If a later segment does not start
  with a tool name line, that segment and everything after it is streamed as content (after the
  calls). Both only happen when the model breaks its own format.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

CALL_SEPARATOR = "<|assistant|>"
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
    text: str  # never empty; a call's fragments concatenate to its arguments


Event = ContentDelta | ToolCallStart | ToolArgsDelta


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def parse_tool_calls(text: str, tool_names: set[str], *, truncated: bool = False) -> list[ToolCall] | None:
    """The tool calls of a whole reply, or None when the reply is plain text."""
    segments = text.split(CALL_SEPARATOR)
    calls = []
    for k, segment in enumerate(segments):
        is_last = k == len(segments) - 1
        name, newline, rest = segment.partition("\n")
        if k > 0 and is_last and not newline:
            # Ended right after a separator, or (cut off) while spelling the next name.
            if segment == "" or (truncated and _could_be_name(segment, tool_names)):
                break
        if not newline or name not in tool_names:
            return None
        arguments = rest.strip()
        if not (_is_json_object(arguments) or (truncated and is_last)):
            return None
        calls.append(ToolCall(new_call_id(), name, arguments))
    return calls


class StreamingToolParser:
    """Feed decoded text deltas of one reply; get content / tool-call events as early as the
    text allows. `calls` holds the calls seen so far, arguments accumulated."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = frozenset(tool_names)
        self.calls: list[ToolCall] = []
        # "name": reading a segment's first line (held back while it may still be a tool name);
        # "args": inside a call's arguments; "content": plain text to the end of the reply.
        self._mode = "name"
        self._pending = ""  # received but not yet emitted text of the current mode
        self._finished = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += delta
        return self._drain()

    def finish(self, truncated: bool = False) -> list[Event]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        events = self._drain()
        pending, self._pending = self._pending, ""
        if self._mode == "args":
            # What was held back (trailing whitespace, a partial separator) is the arguments'
            # end after all; only the whitespace goes.
            self._emit_args(self._args_start_strip(pending).rstrip(), events)
        elif self._mode == "name" and pending:
            # The reply ended inside a first line that could still have been a tool name.
            if not (self.calls and truncated):
                events.append(ContentDelta(pending))
        return events

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._mode == "content":
                if self._pending:
                    events.append(ContentDelta(self._pending))
                    self._pending = ""
                return events
            if self._mode == "name":
                line, newline, rest = self._pending.partition("\n")
                if newline and line in self.tool_names:
                    call = ToolCall(new_call_id(), line, "")
                    self.calls.append(call)
                    events.append(ToolCallStart(len(self.calls) - 1, call.id, call.name))
                    self._pending, self._mode = rest, "args"
                elif newline or not _could_be_name(line, self.tool_names):
                    self._mode = "content"  # the held text is content too
                else:
                    return events  # may still become a tool name: hold
            if self._mode == "args":
                text = self._args_start_strip(self._pending)
                end = text.find(CALL_SEPARATOR)
                if end >= 0:
                    self._emit_args(text[:end].rstrip(), events)
                    self._pending, self._mode = text[end + len(CALL_SEPARATOR) :], "name"
                    continue
                # Hold back a possible start of the separator and trailing whitespace (the
                # arguments are stripped): both may turn out not to belong to the arguments.
                safe = text[: len(text) - _partial_suffix_len(text, CALL_SEPARATOR)].rstrip()
                self._emit_args(safe, events)
                self._pending = text[len(safe) :]
                return events

    def _args_start_strip(self, text: str) -> str:
        # Leading whitespace of the arguments is dropped until the first argument character.
        return text if self.calls[-1].arguments else text.lstrip()

    def _emit_args(self, text: str, events: list[Event]) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(ToolArgsDelta(len(self.calls) - 1, text))


def _could_be_name(prefix: str, tool_names) -> bool:
    return any(name.startswith(prefix) for name in tool_names)


def _partial_suffix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
