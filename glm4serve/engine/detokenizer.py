"""Token ids -> text deltas that are safe to stream: whole characters only, no partial stop strings.

Works on bytes: a token is `tokenizer.token_bytes(id)` (a special token: its text as UTF-8), and
GLM-4's byte-level BPE splits Chinese characters and emoji across tokens. An incremental UTF-8
decoder keeps the incomplete tail of a character until its last byte arrives; bytes that can
never complete a character become U+FFFD as soon as that is certain (and, at `flush`, a tail
left unfinished), so the concatenated deltas equal decoding all the bytes at once.

Stop strings: after the decoded text we hold back the longest suffix that is a prefix of some stop
string. Any stop string completed by a new token therefore starts inside `held + new text`, so
each step searches only that: O(new text + longest stop string) per token, whatever the length
of the text so far. Before min_tokens the tail is held back all the same but nothing is matched,
so a stop string that begins then and ends after is found (as vLLM finds it), and one that ended
before is not.
"""

from __future__ import annotations

import codecs

from .types import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.special_token_text = params.special_token_text or {}
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.stop_strings = [s for s in params.stop if s]  # "" would match before any text
        self._leading_newline = params.stops_skip_leading_newline  # until the first text
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet emitted: a suffix that could begin a stop string
        self.stopped: str | None = None  # the stop string matched; later tokens are ignored

    def add(self, token_id: int, check_stops: bool = True) -> tuple[str, str | None]:
        """Feed one generated token: (text safe to emit now, the stop string it completed or None).
        check_stops=False (before min_tokens, or for a stop token's own text): no stop string is looked for,
        but the tail that could begin one is still held back, so a sequence that ends here must flush()."""
        if self.stopped is not None:
            return "", None
        if token_id in self.special_token_text:
            # the bytes before it can no longer complete a character: as when its own bytes follow
            new_text = self._utf8.decode(b"", final=True) + self.special_token_text[token_id]
            self._utf8.reset()
        elif self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return "", None
        else:
            new_text = self._utf8.decode(self.tokenizer.token_bytes(token_id))
        if self._leading_newline and new_text:
            self._leading_newline = False
            if new_text.startswith("\n"):  # passed on, never part of a stop string
                text, stop = self._with_stops(new_text[1:], check_stops)
                return "\n" + text, stop
        return self._with_stops(new_text, check_stops)

    def _with_stops(self, new_text: str, check_stops: bool) -> tuple[str, str | None]:
        if not new_text:
            return "", None
        if not self.stop_strings:
            return new_text, None
        text = self._held + new_text
        match = self._first_stop(text, len(self._held)) if check_stops else None
        if match is not None:
            start, stop = match
            self.stopped, self._held = stop, ""
            end = start + len(stop) if self.include_stop_str_in_output else start
            return text[:end], stop
        keep = self._held_back_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], None

    @property
    def unfinished_bytes(self) -> bytes:
        """The start of a character whose last byte has not come yet."""
        return self._utf8.getstate()[0]

    def flush(self) -> str:
        """The held-back text (and U+FFFD for an unfinished character), for a sequence that ends
        for another reason than a stop string: a stop token, max_tokens, abort. Empty after a stop
        string matched."""
        if self.stopped is not None:
            return ""
        text = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return text

    def _first_stop(self, text: str, new_from: int) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence ending after `new_from` (in the new text) that ends
        first (then: starts first), i.e. the one that char-by-char streaming would have completed
        first, whatever the token boundaries. One that ends in the held text ended before min_tokens."""
        best = None
        for stop in self.stop_strings:
            start = text.find(stop, max(new_from - len(stop) + 1, 0))
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best[0]:
                    best = (key, stop)
        return None if best is None else (best[0][1], best[1])

    def _held_back_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string.

        Tried in place at each start where a stop string's first character occurs, rather than
        looked up in a set of all prefixes: that set is quadratic in a stop string's length."""
        best = 0
        for stop in self.stop_strings:
            start = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while start >= 0 and len(text) - start > best:
                if stop.startswith(text[start:]):
                    best = len(text) - start
                    break
                start = text.find(stop[0], start + 1)
        return best
