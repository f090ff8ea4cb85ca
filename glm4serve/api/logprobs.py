"""Engine TokenLogprob -> the two OpenAI logprob shapes (chat's list of entries, completions'
parallel arrays)."""

from __future__ import annotations

import math

from glm4serve.engine.types import TokenLogprob

# JSON has no -inf; vLLM sends this floor too.
_MIN_LOGPROB = -9999.0


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else _MIN_LOGPROB


def token_text_and_bytes(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    # A token may be half of a multi-byte character: the string shows U+FFFD, `bytes` is exact.
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprob_entries(tokenizer, logprobs: list[TokenLogprob]) -> list[dict]:
    entries = []
    for lp in logprobs:
        text, raw = token_text_and_bytes(tokenizer, lp.token_id)
        top = []
        for tid, tlp in lp.top:
            t_text, t_raw = token_text_and_bytes(tokenizer, tid)
            top.append({"token": t_text, "logprob": _finite(tlp), "bytes": t_raw})
        entries.append({"token": text, "logprob": _finite(lp.logprob), "bytes": raw, "top_logprobs": top})
    return entries


class CompletionLogprobs:
    """Accumulates one choice's `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`."""

    def __init__(self, tokenizer, text_offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = text_offset  # where the next token starts in the choice's text
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, logprobs: list[TokenLogprob]) -> dict:
        """Append one step's tokens; returns just that step's part (a stream chunk's logprobs)."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            text, _ = token_text_and_bytes(self.tokenizer, lp.token_id)
            top = {token_text_and_bytes(self.tokenizer, tid)[0]: _finite(tlp) for tid, tlp in lp.top}
            top.setdefault(text, _finite(lp.logprob))  # OpenAI always lists the chosen token
            part["tokens"].append(text)
            part["token_logprobs"].append(_finite(lp.logprob))
            part["top_logprobs"].append(top)
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        self.tokens += part["tokens"]
        self.token_logprobs += part["token_logprobs"]
        self.top_logprobs += part["top_logprobs"]
        self.text_offset += part["text_offset"]
        return part

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
