"""A reasoning model's thinking, split from its answer: GLM-Z1 thinks before it answers, and its
chat template opens the thinking itself (the generation prompt ends with `<think>`), so a reply is
`{thinking}</think>{answer}`. As vLLM's `deepseek_r1` reasoning parser: the thinking runs to the
first `</think>`; an opening `<think>` the model writes anyway is dropped; a reply without
`</think>` is all thinking (cut while it thought).

The text is split, not the token ids: `</think>` may be one token or several.
"""

from __future__ import annotations

from collections.abc import Iterable

THINK_START, THINK_END = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(thinking, answer) of a whole reply; answer None when the thinking never ended."""
    text = text.removeprefix(THINK_START)
    thinking, end, answer = text.partition(THINK_END)
    return thinking, (answer if end else None)


class StreamingReasoningParser:
    """The same split over a reply's text deltas: each `feed` gives the (thinking, answer) text it
    can tell apart so far, holding back what may be the start of a tag."""

    def __init__(self):
        self.thinking = True
        self._started = False  # past where an opening <think> could be
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        if not self.thinking:
            return "", delta
        text = self._held + delta
        self._held = ""
        if not self._started:
            if THINK_START.startswith(text):  # maybe the opening tag, not all of it yet
                self._held = text
                return "", ""
            self._started = True
            text = text.removeprefix(THINK_START)
        thinking, end, answer = text.partition(THINK_END)
        if end:
            self.thinking = False
            return thinking, answer
        keep = _tag_prefix_len(text, THINK_END)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], ""

    def finish(self) -> str:
        """The held-back text (thinking: the reply ended inside it)."""
        held, self._held = self._held, ""
        return "" if held == THINK_START else held


class ThinkingTokens:
    """Counts a reply's thinking tokens from their bytes: those up to the one that completes `</think>`
    (its own tokens included), and every token while none has."""

    def __init__(self):
        self.count = 0
        self.done = False  # a token completed the tag: the rest is answer
        self._tail = b""  # the last bytes, which may begin the tag

    def feed(self, token_bytes: Iterable[bytes]) -> int:
        """The next tokens' bytes: how many of them are thinking."""
        end, n = THINK_END.encode(), 0
        for b in token_bytes:
            if self.done:
                break
            n += 1
            self._tail += b
            self.done = end in self._tail
            self._tail = self._tail[1 - len(end):]
        self.count += n
        return n


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (0 when none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
