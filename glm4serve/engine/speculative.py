"""Speculative decoding by prompt lookup (vLLM's "ngram" method): drafts without a draft model.

A decoding sequence whose last tokens already occurred earlier in its context guesses that what
followed them then follows them now: the next `num_speculative_tokens` tokens after that earlier
occurrence. The model then computes its real token and every drafted one in one forward, and
the engine samples position by position, keeping drafted tokens while each equals the token it
sampled there. Every token it emits is still drawn from the model's own distribution given the
true prefix, so greedy and seeded replies are the same with and without speculation; what
changes is how many tokens one forward (one read of every weight) yields. That pays on a
memory-bound decode (a CPU, a GPU at small batches) and for replies that repeat their context:
code edits, quotes, extraction, summaries of a document in the prompt.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """vLLM's --speculative-config, for the one method served here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["ngram"] = "ngram"
    num_speculative_tokens: int = Field(ge=1, le=64, description="most tokens drafted per sequence and step")
    prompt_lookup_max: int | None = Field(None, ge=1, description="longest n-gram looked up (default: as min, or 5)")
    prompt_lookup_min: int | None = Field(None, ge=1, description="shortest n-gram looked up (default: as max, or 5)")
    # a draft's rows cost little beside a lone sequence's read of the weights, but a big batch's products
    # are compute-bound on a CPU (BENCHMARKS.md): there the drafts' rows cost what they may save
    disable_by_batch_size: int | None = Field(None, ge=1, description="no drafts while more sequences run")

    @model_validator(mode="after")
    def _window(self):
        # vLLM's defaults: each side takes the other's value, and 5 when neither is given
        lo = self.prompt_lookup_min or self.prompt_lookup_max or 5
        hi = self.prompt_lookup_max or lo
        if lo > hi:
            raise ValueError(f"prompt_lookup_min {lo} exceeds prompt_lookup_max {hi}")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        return self

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """A JSON object (the CLI's and env's form), a mapping (YAML), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            value = json.loads(value)
        return cls.model_validate(value)

    def draft(self, token_ids: list[int], max_tokens: int) -> list[int]:
        return ngram_draft(token_ids, min(max_tokens, self.num_speculative_tokens),
                           self.prompt_lookup_min, self.prompt_lookup_max)


def ngram_draft(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n tokens,
    for the longest n in [n_min, n_max] that occurs earlier; [] when none does."""
    if k <= 0 or len(token_ids) <= n_min:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        # windows[i] = tokens[i:i + n], for every start before the suffix's own
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            follow = hits[-1] + n
            return tokens[follow : follow + k].tolist()
    return []
