"""Engine TokenLogprob -> the two OpenAI logprob shapes (chat's list of entries, completions'
parallel arrays), and vLLM's `prompt_logprobs`."""

from __future__ import annotations

import codecs
import math

from glm4serve.engine.detokenizer import IncrementalDetokenizer
from glm4serve.engine.types import SamplingParams, TokenLogprob

# JSON has no -inf; vLLM sends this floor too.
_MIN_LOGPROB = -9999.0


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else _MIN_LOGPROB


def token_text_and_bytes(tokenizer, token_id: int, as_id: bool = False) -> tuple[str, list[int]]:
    """How logprobs name a token: its text, or with `as_id` vLLM's "token_id:{id}" (its
    return_tokens_as_token_ids), which tells apart what text cannot (half a character, two tokens
    of one text); and its bytes."""
    raw = tokenizer.token_bytes(token_id)
    # A token may be half of a multi-byte character: the string shows U+FFFD, `bytes` is exact.
    return f"token_id:{token_id}" if as_id else raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprob_entries(tokenizer, logprobs: list[TokenLogprob], as_ids: bool = False) -> list[dict]:
    entries = []
    for lp in logprobs:
        text, raw = token_text_and_bytes(tokenizer, lp.token_id, as_ids)
        top = []
        for tid, tlp in lp.top:
            t_text, t_raw = token_text_and_bytes(tokenizer, tid, as_ids)
            top.append({"token": t_text, "logprob": _finite(tlp), "bytes": t_raw})
        entries.append({"token": text, "logprob": _finite(lp.logprob), "bytes": raw, "top_logprobs": top})
    return entries


def echo_text(tokenizer, token_ids: list[int], skip_special_tokens: bool) -> str:
    """The prompt as a completion echoes it: decoded as the reply's own tokens are (special tokens
    skipped or not alike), and on its own, as the engine decodes the reply (a character the prompt
    leaves unfinished shows as U+FFFD), so that the logprobs' text offsets index it."""
    text = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip_special_tokens))
    return "".join([text.add(t)[0] for t in token_ids]) + text.flush()


def vllm_prompt_logprobs(tokenizer, prompt_logprobs: list[TokenLogprob | None], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {"logprob", "rank",
    "decoded_token"}}, the prompt's own token first, then the k likeliest."""
    def entry(token_id: int, logprob: float, rank: int | None) -> dict:
        text = token_text_and_bytes(tokenizer, token_id)[0]
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}

    result: list[dict | None] = []
    for lp in prompt_logprobs:
        if lp is None:
            result.append(None)
            continue
        tokens = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (tid, tlp) in enumerate(lp.top[:k], 1):
            tokens.setdefault(str(tid), entry(tid, tlp, rank))
        result.append(tokens)
    return result


class CompletionLogprobs:
    """Accumulates one choice's `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`.

    A token's offset is where its first byte's character sits in the choice's text, which the
    engine's detokenizer made (special tokens skipped or not). Token strings cannot be added up for
    it: half a character shows as U+FFFD in `tokens`."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids  # tokens named "token_id:{id}" (token_text_and_bytes)
        self._text = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip_special_tokens))
        self.offset = 0  # characters of the choice's text so far
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, logprobs: list[TokenLogprob]) -> dict:
        """Append one step's tokens; returns just that step's part (a stream chunk's logprobs)."""
        return self._add([(lp.token_id, lp) for lp in logprobs], None)

    def add_prompt(self, token_ids: list[int], prompt_logprobs: list[TokenLogprob | None], k: int) -> dict:
        """Append the echoed prompt's tokens (echo_text), each with its k likeliest alternatives; the
        first has no logprob (null, as OpenAI sends it)."""
        part = self._add(list(zip(token_ids, prompt_logprobs, strict=True)), k)
        self.offset += len(self._text.flush())  # the reply's text starts afresh, as the engine decodes it
        return part

    def _add(self, items: list[tuple[int, TokenLogprob | None]], k: int | None) -> dict:
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in items:
            text, _ = token_text_and_bytes(self.tokenizer, token_id, self.as_ids)
            logprob = top = None
            if lp is not None:
                logprob = _finite(lp.logprob)
                top = {token_text_and_bytes(self.tokenizer, tid, self.as_ids)[0]: _finite(tlp)
                       for tid, tlp in lp.top[:k]}
                top.setdefault(text, logprob)  # OpenAI always lists the chosen token
            part["tokens"].append(text)
            part["token_logprobs"].append(logprob)
            part["top_logprobs"].append(top)
            part["text_offset"].append(self._take(token_id))
        self.tokens += part["tokens"]
        self.token_logprobs += part["token_logprobs"]
        self.top_logprobs += part["top_logprobs"]
        self.text_offset += part["text_offset"]
        return part

    def _take(self, token_id: int) -> int:
        """The token's offset; its characters are added to the text so far."""
        start, unfinished = self.offset, self._text.unfinished_bytes
        skipped = self._text.skip_special_tokens and self.tokenizer.is_special(token_id)
        if unfinished and not skipped and _breaks(unfinished, self.tokenizer.token_bytes(token_id)[:1]):
            start += 1  # the unfinished character ends before this token, as U+FFFD
        self.offset += len(self._text.add(token_id)[0])
        return start

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def _breaks(unfinished: bytes, next_byte: bytes) -> bool:
    """Whether next_byte cannot continue the unfinished UTF-8 character."""
    try:
        codecs.utf_8_decode(unfinished + next_byte, "strict", False)
        return False
    except UnicodeDecodeError:
        return True
