"""One choice of one request as the engine tracks it: its tokens, its KV blocks, its state.

A request with `n` choices becomes `n` sequences with the same `request_id` and indices
0..n-1. The scheduler moves a sequence WAITING -> RUNNING -> FINISHED (and RUNNING -> WAITING
when it is preempted); the engine appends the tokens it samples.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .block_pool import hash_block, hash_root
from .types import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds the KV blocks of its first num_computed_tokens tokens
    FINISHED = "finished"  # blocks freed; finish_reason says why


@dataclass(eq=False)  # identity semantics: two sequences with equal tokens are still two sequences
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within the request
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV blocks of tokens 0.., in order
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # set by the scheduler's first admission of it
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    num_cache_write_tokens: int = 0  # prompt tokens its first admission will add to the prefix cache
    lora: str | None = None  # the key of its LoRA adapter in the runner (params.lora names it); None: none
    # per-choice sampling state: it survives preemption, unlike the KV blocks
    generator: torch.Generator | None = None
    stop_token_ids: frozenset[int] = frozenset()
    detokenizer: Any = None  # an IncrementalDetokenizer; Any keeps this module free of tokenizers
    guide: Any = None  # a guided.Guide when the request is constrained: it has taken every output token
    token_counts: Any = None  # a processors.TokenCounts when the request has penalties
    # speculative decoding: drafts in a row that kept nothing, and decode steps left without one
    draft_misses: int = 0
    draft_pause: int = 0
    # when params.prompt_logprobs is set: those of prompt positions 0.. so far (a TokenLogprob | None each)
    prompt_logprobs: list | None = None
    # chain hashes of its first full blocks (prefix caching), filled on demand; tokens are only
    # ever appended, so they never go stale, and they survive preemption
    _block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # all_token_ids as int64, its first _array_len filled (token_array)
    _array: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    _array_len: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying a long prompt every decode step."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def token_array(self) -> np.ndarray:
        """all_token_ids as an int64 array (a view), grown as tokens are appended rather than converted
        anew: a draft lookup reads the whole context every decode step."""
        n = self.num_tokens
        if self._array.size < n:
            grown = np.empty(max(n, 2 * self._array.size), dtype=np.int64)
            grown[: self._array_len] = self._array[: self._array_len]
            self._array = grown
        if self._array_len < n:
            self._array[self._array_len : n] = self.token_ids_between(self._array_len, n)
            self._array_len = n
        return self._array[:n]

    def block_hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Chain hashes (block_pool.hash_block) of its first `num_blocks` blocks, which must be full."""
        if num_blocks * block_size > self.num_tokens:
            raise ValueError(f"{self} has fewer than {num_blocks} full blocks of {block_size}")
        hashes = self._block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            tokens = self.token_ids_between(i * block_size, (i + 1) * block_size)
            hashes.append(hash_block(hashes[-1] if i else hash_root(self.lora, self.params.cache_salt), tokens))
        return hashes[:num_blocks]

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs were asked for and some are not computed yet: its prompt cannot come from the
        prefix cache, and its prefill chunks return logits after every token."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """More than the last token is still missing from the cache (a prompt, or a recompute)."""
        return self.num_computed_tokens < self.num_tokens - 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index} id={self.seq_id} {self.status.value} "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens} computed={self.num_computed_tokens} "
            f"blocks={self.block_table})"
        )
