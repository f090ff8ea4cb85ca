"""What a row's distribution is made of, before any truncation or draw: a request's penalties, logit_bias,
min_tokens, allowed_token_ids, bad_words and temperature, applied to one step's logits (`apply_processors`).

A sequence with penalties keeps its tokens' counts between steps (`TokenCounts`), so a step's cost follows
what it added, not the reply's length or the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .types import SamplingParams


class NoTokenLeft(ValueError):
    """A request's own rules (allowed_token_ids, bad_words, min_tokens, its grammar) leave its row no token to
    sample."""


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # from make_generator; None = the global RNG
    stop_token_ids: frozenset[int]  # effective stop ids: suppressed while len(output) < params.min_tokens
    guide: Any = None  # a guided.Guide when the request is constrained
    token_counts: TokenCounts | None = None  # the sequence's, kept between steps, when it has penalties



class TokenCounts:
    """A sequence's tokens as its penalties read them, kept from step to step: each distinct output token
    and its count, and the prompt's distinct tokens. A step adds only what the output gained since the
    last (the output only grows), and the penalties touch only these tokens' logits, not all V of a row:
    the cost of a step follows what it added, not the reply's length or the vocabulary."""

    def __init__(self, device: torch.device | None = None, vocab_size: int = 0):
        self._device, self._vocab_size = device, vocab_size
        self._ids = torch.empty(0, dtype=torch.long, device=device)  # [capacity]: distinct output tokens
        self._counts = torch.empty(0, device=device)  # [capacity] float32: their counts
        self._size = 0
        self._position: dict[int, int] = {}  # token -> its place in _ids
        self._counted = 0  # output tokens counted
        self._prompt: torch.Tensor | None = None  # [P'] distinct prompt tokens

    def update(self, output: list[int], vocab_size: int, device: torch.device) -> None:
        """Count the tokens `output` (the sequence's whole output so far) gained; ids past V are ignored."""
        if (device, vocab_size) != (self._device, self._vocab_size) or len(output) < self._counted:
            self.__init__(device, vocab_size)  # counted anew: a first step, or logits of another shape
        new = [t for t in output[self._counted :] if t < vocab_size]
        if not new:
            self._counted = len(output)
            return
        fresh = [t for t in dict.fromkeys(new) if t not in self._position]
        if self._size + len(fresh) > self._ids.shape[0]:
            capacity = max(64, 2 * (self._size + len(fresh)))
            ids, counts = torch.zeros(capacity, dtype=torch.long, device=device), torch.zeros(capacity, device=device)
            ids[: self._size], counts[: self._size] = self.output_ids, self.output_counts
            self._ids, self._counts = ids, counts
        if fresh:
            self._position.update((t, self._size + j) for j, t in enumerate(fresh))
            self._ids[self._size : self._size + len(fresh)] = torch.tensor(fresh, device=device)
            self._size += len(fresh)
        places = torch.tensor([self._position[t] for t in new], device=device)
        self._counts.index_add_(0, places, torch.ones(len(new), device=device))
        self._counted = len(output)

    @property
    def output_ids(self) -> torch.Tensor:
        return self._ids[: self._size]

    @property
    def output_counts(self) -> torch.Tensor:
        return self._counts[: self._size]

    def prompt_ids(self, prompt: list[int]) -> torch.Tensor:
        """The prompt's distinct tokens below V (after an update, which sets the device and V)."""
        if self._prompt is None:
            self._prompt = torch.tensor(sorted({t for t in prompt if t < self._vocab_size}), dtype=torch.long,
                                        device=self._device)
        return self._prompt


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _suppresses_stops(row: SampleRow) -> bool:
    # A grammar decides alone when its reply may end: it allows stop ids only once complete, and
    # suppressing them then would leave no token at all. So min_tokens does not apply to it.
    return bool(row.stop_token_ids) and len(row.output_token_ids) < row.params.min_tokens and row.guide is None


def needs_processing(row: SampleRow) -> bool:
    p = row.params
    return (
        has_penalties(p)
        or bool(p.logit_bias)
        or _suppresses_stops(row)
        or p.allowed_token_ids is not None
        or bool(p.bad_words_token_ids)
        or (not p.greedy and p.temperature != 1.0)
    )


def select_rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of `t`, without a copy when that is all of them in order."""
    return t if idx == list(range(t.shape[0])) else t[idx]


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place. Repetition penalty (HF/vLLM): over prompt + output tokens, positive logits are
    divided by it and negative ones multiplied. Presence/frequency (OpenAI): over output tokens,
    logit -= presence * [count > 0] + frequency * count. Each is one gather and one scatter over
    the (row, token) pairs it touches, all rows at once."""
    idx = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    if not idx:
        return
    device = logits.device
    kept = {i: rows[i].token_counts or TokenCounts() for i in idx}
    for i in idx:
        kept[i].update(rows[i].output_token_ids, logits.shape[1], device)

    def pairs(which: list[int], tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, tokens) of `which`'s tokens, and each pair's place in `which`."""
        cols = [tokens(i) for i in which]
        lengths = [c.shape[0] for c in cols]  # output_size given: on a GPU, no wait for the device to say it
        owner = torch.repeat_interleave(torch.tensor(lengths, device=device), output_size=sum(lengths))
        return torch.tensor(which, device=device)[owner], torch.cat(cols), owner

    def per_pair(values: list[float], owner: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[owner]

    rep = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    if rep:  # a token in both the prompt and the output is listed twice: both write the same value
        r, c, owner = pairs(rep, lambda i: torch.cat([kept[i].prompt_ids(rows[i].prompt_token_ids),
                                                      kept[i].output_ids]))
        penalty = per_pair([rows[i].params.repetition_penalty for i in rep], owner)
        v = logits[r, c]
        logits[r, c] = torch.where(v > 0, v / penalty, v * penalty)
    counted = [i for i in idx if rows[i].params.presence_penalty != 0.0 or rows[i].params.frequency_penalty != 0.0]
    if counted:
        r, c, owner = pairs(counted, lambda i: kept[i].output_ids)
        counts = torch.cat([kept[i].output_counts for i in counted])
        presence = per_pair([rows[i].params.presence_penalty for i in counted], owner)
        frequency = per_pair([rows[i].params.frequency_penalty for i in counted], owner)
        logits[r, c] -= presence + frequency * counts


def _banned(row: SampleRow) -> list[int]:
    """The tokens bad_words rules out next: each word's last token, where the output ends with the rest."""
    out, banned = row.output_token_ids, []
    for word in row.params.bad_words_token_ids or ():
        rest = word[:-1]
        if not rest or (len(out) >= len(rest) and out[len(out) - len(rest):] == rest):
            banned.append(word[-1])
    return banned


def apply_processors(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits each row's distribution is made of: penalties, logit_bias, min_tokens, allowed
    tokens and bad words, temperature.

    Order: penalties first, on the model's own logits (the repetition penalty's sign test must
    see the model's logit, not a biased one); then logit_bias, the user's explicit override; then
    -inf on the stop ids while fewer than min_tokens were generated, on every token but the allowed
    ones and on what bad words rule out, which nothing can undo; then temperature (sampled rows only:
    a greedy row's temperature is 0 and its scale is left at 1).

    Never modifies `logits`; returns it unchanged when no row has anything to do, else a new
    float32 tensor [len(rows), V].
    """
    if not any(needs_processing(r) for r in rows):
        return logits
    out = logits.to(torch.float32, copy=True)
    vocab_size, device = out.shape[1], out.device
    _apply_penalties(out, rows)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            bias = [(int(t), float(b)) for t, b in row.params.logit_bias.items() if 0 <= int(t) < vocab_size]
            if bias:
                ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
                out[i, ids] += torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)
        if _suppresses_stops(row):
            stops = [t for t in row.stop_token_ids if 0 <= t < vocab_size]
            out[i, stops] = -math.inf
        if row.params.allowed_token_ids is not None:
            keep = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(row.params.allowed_token_ids, dtype=torch.long, device=device)
            keep[ids[(ids >= 0) & (ids < vocab_size)]] = True
            out[i].masked_fill_(~keep, -math.inf)
        if row.params.bad_words_token_ids:
            out[i, [t for t in _banned(row) if 0 <= t < vocab_size]] = -math.inf
        if (row.params.allowed_token_ids is not None or row.params.bad_words_token_ids) and not bool(
                torch.isfinite(out[i]).any()):
            raise NoTokenLeft("allowed_token_ids, bad_words and min_tokens leave no token to write")
    temperatures = [1.0 if r.params.greedy else r.params.temperature for r in rows]
    if any(t != 1.0 for t in temperatures):
        out /= torch.tensor(temperatures, dtype=torch.float32, device=device)[:, None]
    return out
