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
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from .block_pool import BlockPool
    from .scheduler import ScheduledSeq

MAX_DRAFT_PAUSE = 15  # most decode steps a sequence whose drafts keep failing goes without one


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


def add_drafts(spec: SpeculativeConfig, scheduled: list[ScheduledSeq], budget: int, pool: BlockPool,
               num_running: int, max_model_len: int) -> None:
    """Spend a step's leftover budget and empty blocks on drafts of its decoding sequences (scheduler.py)."""
    if spec.disable_by_batch_size is not None and num_running > spec.disable_by_batch_size:
        return
    for s in scheduled:
        seq = s.seq
        if budget <= 0:
            break
        # a decode that samples for itself alone: not a fork's parent, not a chunk of prompt logprobs
        if s.num_tokens != 1 or s.sample_for != [seq] or s.prompt_logits:
            continue
        if seq.draft_pause > 0:
            seq.draft_pause -= 1
            continue
        # the real token and every guess stay within max_model_len, max_tokens, and the sequence's own
        # blocks plus the empty ones (a guess is not worth a cached prefix)
        room = (len(seq.block_table) + pool.num_empty) * pool.block_size - seq.num_tokens
        k = min(budget, room, max_model_len - seq.num_tokens, seq.params.max_tokens - seq.num_output_tokens - 1)
        draft = spec.draft(seq.token_array(), k) if k > 0 else []
        if draft:
            more = pool.blocks_needed(seq.num_tokens + len(draft)) - len(seq.block_table)
            if more > 0:
                seq.block_table.extend(pool.allocate(more))
            s.draft = draft
            s.num_tokens += len(draft)
            budget -= len(draft)


def pause_after(misses: int) -> int:
    """Decode steps without a draft after `misses` drafts in a row that kept nothing. A reply that keeps
    refusing its drafts (it does not repeat its context) pays for their rows in every step: it drafts
    again after 1, 3, 7, then every MAX_DRAFT_PAUSE + 1 steps, until one is kept."""
    return min(2**misses - 1, MAX_DRAFT_PAUSE)
