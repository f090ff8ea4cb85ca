"""Speculative decoding by prompt lookup (vLLM's "ngram" method): drafts without a draft model.

A decoding sequence whose last tokens already occurred earlier in its context guesses that what
followed them then follows them now: the next `num_speculative_tokens` tokens after that earlier
occurrence. The model then computes its real token and every drafted one in one forward, and
the engine samples position by position, keeping drafted tokens while each equals the token it
sampled there. Every token it emits is still drawn from the model's own distribution given the
true prefix, so greedy and seeded replies are the same with and without speculation, up to the
rounding of the kernels that compute a draft's rows (bf16 and int8 more than float32); what
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
            value = json.loads(value) if value.strip() else None
        return None if value is None else cls.model_validate(value)

    def draft(self, token_ids, max_tokens: int) -> list[int]:
        return ngram_draft(token_ids, min(max_tokens, self.num_speculative_tokens),
                           self.prompt_lookup_min, self.prompt_lookup_max)


def ngram_draft(token_ids, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n tokens,
    for the longest n in [n_min, n_max] that occurs earlier; [] when none does. `token_ids`: a list or
    an int64 array (Sequence.token_array, which a long context need not convert every step)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    size = len(tokens)
    if k <= 0 or size <= n_min:
        return []
    # earlier places of the last token, each the possible end of an earlier copy of the suffix
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        match = ends[ends >= n - 1]
        for back in range(1, n):
            match = match[tokens[match - back] == tokens[size - 1 - back]]
        if match.size:
            follow = match[-1] + 1
            return tokens[follow : follow + k].tolist()
    return []
