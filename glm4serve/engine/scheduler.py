"""Continuous batching over a paged KV cache: which tokens of which sequences go into the next forward.

Each step has a budget of `max_num_batched_tokens` query tokens, spent in this order:

1. running sequences that decode (one token each), oldest first;
2. running sequences part-way through a prefill continue with a chunk of it;
3. waiting sequences are admitted first come first served, their prefill cut to what is left,
   so a 100K prompt never stalls the others' decode: it takes the leftover budget each step.

A prompt's chunk is also at most `long_prefill_token_threshold` tokens (vLLM's, where it is set):
the budget bounds a step's tokens, this how long a step with a prompt chunk in it keeps the decoding
sequences waiting for their next token.

KV blocks for a step's tokens are allocated here, at schedule time. When a sequence needs a block
and none is free, the NEWEST running sequence not yet scheduled this step is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later as one prefill over
its prompt and the tokens it has generated so far. Nothing is ever dropped.

`n > 1`: only choice 0 prefills. Its siblings wait, unforked, and sample their first token from
the logits row of its last prefill chunk; then they are forked: they take a reference on every
prompt block. The last, partial prompt block is copied on write: whichever sequence first writes
into a block it shares gets a fresh block, reported in `block_copies` for the model runner to copy
before the forward. A parent and its siblings take their seats together, so choices past
`max_num_seqs` form further groups of at most that many, queued behind the first, each prefilled by
its own first choice (from the prefix cache, when the first group's prompt is still there).

Prefix caching: once a full block's K/V is computed it is registered in the pool under the chain
hash of its tokens. A sequence admitted with nothing computed (new, or preempted) first takes
the cached blocks of its longest cached prefix, a reference each, and its prefill starts after
them. At least its last token is always computed, since its logits are needed: the hit is cut
to whole blocks before that token, so a cached block, shared and full, is never written into.

Priority policy (`SchedulerConfig.policy`, vLLM's): sequences rank by (request priority, arrival),
lower first. The queue is kept in that order, preempted sequences included; the lowest-ranked
running sequence is the one preempted for room; and when the first waiting sequence has no seat or
too few free blocks for its first chunk, running ones of a strictly lower priority are preempted for
it, at the start of a step. Equal priorities never preempt each other, so this cannot thrash.

Speculative decoding (`SchedulerConfig.speculative`): once everything above is scheduled, what the
step has left, budget and empty blocks (never a cached prefix's), goes to drafts (speculative.py):
the tokens guessed to follow a decoding sequence's next one, computed in the same forward, oldest
sequence first. So a draft never delays a decode or a prefill, preempts anything or evicts a cached
prefix; a sequence whose drafts keep failing drafts less and less often, down to one step in 16.
The step first counts only the real token as computed (`on_step_done`); the engine then tells each
drafted token the sampler kept (`keep_draft_token`, before it samples the token after it, which may
end the sequence), and last how many it kept (`accept_draft`): the blocks past them go back to the
pool. So the prefix cache holds every kept token, as in plain decoding, and never a rejected one.

Prompt logprobs: a sequence that asks for them computes its whole prompt (no prefix cache hit, as
in vLLM), and its prefill chunks return logits after every token: at most PROMPT_LOGIT_ROWS rows a
step, all such sequences together, since each row is a vocabulary of fp32 logits.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .block_pool import BlockPool
from .config import SchedulerConfig
from .sequence import Sequence, SeqStatus
from .speculative import add_drafts, pause_after
from .types import ABORT

# [2048, 151552] fp32 logits: 1.2 GB at GLM-4's vocabulary. Fewer rows cut a prompt into more steps, and
# every step reads all the weights (dequantizes them, on CPU): see BENCHMARKS.md, scoring prompts
PROMPT_LOGIT_ROWS = 2048


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # == seq.num_computed_tokens: first position of this step's tokens
    num_tokens: int  # query tokens this step: seq.all_token_ids[start:start + num_tokens]
    sample_for: list[Sequence]  # who samples from its last row's logits; empty = none (mid-prefill)
    prompt_logits: bool = False  # logits after every token, for prompt logprobs (the last row samples)
    draft: list[int] = field(default_factory=list)  # guessed tokens after its last one, the last num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids_between(self.start, self.start + self.num_tokens - len(self.draft)) + self.draft

    @property
    def all_logits(self) -> bool:
        """Prompt logprobs and drafts need logits after every token; a sample, after its last."""
        return self.prompt_logits or bool(self.draft)

    @property
    def num_logit_rows(self) -> int:
        return self.num_tokens if self.all_logits else int(bool(self.sample_for))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): copy before the forward
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_logit_rows(self) -> int:
        return sum(s.num_logit_rows for s in self.scheduled)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: BlockPool):
        if pool.block_size != cfg.block_size:
            raise ValueError(f"pool block size {pool.block_size} != scheduler block size {cfg.block_size}")
        # A lone sequence of max_model_len must fit, or preemption could never make room for it.
        if pool.num_blocks * pool.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache holds {pool.num_blocks * pool.block_size} tokens, less than "
                f"max_model_len {cfg.max_model_len}: lower max_model_len or give the cache more memory"
            )
        self.cfg = cfg
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admission first; preemption takes from the end
        self._forks: dict[int, list[Sequence]] = {}  # parent seq_id -> its unforked siblings
        self._requests: dict[str, list[Sequence]] = {}  # unfinished sequences of each request
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found there (not computed again)

    # --- bookkeeping --------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(s) for s in self._forks.values())

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_requests(self) -> int:
        """Requests with an unfinished sequence."""
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def seqs_of(self, request_id: str) -> list[Sequence]:
        return list(self._requests.get(request_id, ()))

    def unfinished(self) -> Iterator[Sequence]:
        return (s for seqs in self._requests.values() for s in seqs)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the n choices of one request (index 0 first); they share its prompt."""
        if not seqs:
            return
        head = seqs[0]
        if any(s.request_id != head.request_id or s.prompt_token_ids != head.prompt_token_ids for s in seqs):
            raise ValueError("add() takes the choices of one request, with one prompt")
        if head.request_id in self._requests:
            raise ValueError(f"request {head.request_id!r} is already in the engine")
        if not head.prompt_token_ids:
            raise ValueError("empty prompt")
        if head.num_prompt_tokens > self.cfg.max_model_len:
            raise ValueError(f"a {head.num_prompt_tokens}-token prompt exceeds max_model_len {self.cfg.max_model_len}")
        for s in seqs:
            s.status = SeqStatus.WAITING
        self._requests[head.request_id] = list(seqs)
        size = self.cfg.max_num_seqs  # a group takes its seats together
        for group in (seqs[i:i + size] for i in range(0, len(seqs), size)):
            self._enqueue(group[0])
            if len(group) > 1:
                self._forks[group[0].seq_id] = group[1:]

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence wherever it is and free its blocks. Finishing twice is a no-op."""
        if seq.status is SeqStatus.FINISHED:
            return
        place = None  # its place in the queue, if waiting
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            place = self.waiting.index(seq)
            del self.waiting[place]
        orphans = self._forks.pop(seq.seq_id, [])
        if orphans:  # the parent ends before its prefill did: its first sibling prefills for the rest, from
            # where a preempted sequence would go, or from a waiting parent's place in the queue (the engine
            # finishes running sequences and whole requests, siblings first; finish() is for any one)
            if place is None:
                self._enqueue(orphans[0], front=True)
            else:
                self.waiting.insert(place, orphans[0])
            if orphans[1:]:
                self._forks[orphans[0].seq_id] = orphans[1:]
        for sibs in self._forks.values():
            if seq in sibs:
                sibs.remove(seq)
        self._forks = {k: v for k, v in self._forks.items() if v}
        self._free_blocks(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        left = [s for s in self._requests.get(seq.request_id, ()) if s is not seq]
        if left:
            self._requests[seq.request_id] = left
        else:
            self._requests.pop(seq.request_id, None)

    def abort(self, request_id: str, reason: str = ABORT, index: int | None = None) -> list[Sequence]:
        """Finish every unfinished sequence of a request, waiting or running, or only its choice `index`;
        return them."""
        seqs = [s for s in self.seqs_of(request_id) if index is None or s.index == index]
        for s in reversed(seqs):  # siblings before their parent: no orphan promotion on the way
            self.finish(s, reason)
        return seqs

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        rows = PROMPT_LOGIT_ROWS  # left for prompt-logprob chunks this step
        taken: set[int] = set()  # seq_ids scheduled this step: never preempted within it
        if self.cfg.policy == "priority":
            self._preempt_for_first_waiting(out)
        outranked = len(out.preempted)  # preemptions before this are no sign of a shortage of blocks

        # 1. decodes, then 2. prefills already under way (FCFS: each oldest first); priority: both in one
        # pass in rank order, so that room is never made from a sequence that outranks the one in need
        if self.cfg.policy == "priority":
            passes = [sorted(self.running, key=_rank)]
        else:
            passes = [[s for s in self.running if not s.is_prefilling], [s for s in self.running if s.is_prefilling]]
        for seqs in passes:
            for seq in seqs:
                if budget == 0:
                    break
                if seq.status is not SeqStatus.RUNNING or seq.seq_id in taken:
                    continue
                if not seq.is_prefilling:  # its next token
                    if self._make_room(seq, 1, taken, out, allow_self=True):
                        self._take(seq, 1, taken, out)
                        budget -= 1
                    continue
                # as much of its chunk as fits, making room from lower-ranked ones (`_victim`)
                want = min(seq.num_tokens - seq.num_computed_tokens, self._chunk_cap(budget),
                           rows if seq.needs_prompt_logits else budget)
                if want == 0:
                    continue
                self._make_room(seq, want, taken, out, allow_self=False)
                n = min(want, self._capacity(seq))
                if n > 0:
                    rows -= n if seq.needs_prompt_logits else 0
                    self._take(seq, n, taken, out)
                    budget -= n

        # 3. admissions in queue order; not in a step that had to preempt for room (it would thrash), nor of one
        # preempted for a higher priority this step (its work would be thrown away for nothing)
        while budget > 0 and self.waiting and len(out.preempted) == outranked:
            seq = self.waiting[0]
            if seq in out.preempted:
                break
            seats = 1 + len(self._forks.get(seq.seq_id, ()))
            if self._seats_taken() + seats > self.cfg.max_num_seqs:
                break
            hit, computed, n = self._first_chunk(seq, budget, rows)
            if n == 0 or self._blocks_short(hit, computed + n) > 0:
                break
            self._admit(self.waiting.popleft(), hit, computed)
            rows -= n if seq.needs_prompt_logits else 0
            self._take(seq, n, taken, out)
            budget -= n
        if self.cfg.speculative is not None:
            add_drafts(self.cfg.speculative, out.scheduled, budget, self.pool, len(self.running),
                       self.cfg.max_model_len)
        return out

    def _admit(self, seq: Sequence, hit: list[int], computed: int) -> None:
        """The first waiting sequence runs, on the cached blocks `hit` of its first `computed` tokens."""
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
            seq.num_cached_tokens = computed
            if self.cfg.enable_prefix_caching:  # the prompt's full blocks are registered as computed
                bs = self.pool.block_size
                # past the hit, those not in the cache already (a whole cached prompt recomputes its last)
                past_hit = seq.block_hashes(bs, seq.num_prompt_tokens // bs)[len(hit):]
                seq.num_cache_write_tokens = bs * sum(self.pool.lookup(h) is None for h in past_hit)
        if self.cfg.enable_prefix_caching and not seq.needs_prompt_logits:  # those never look it up
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += computed
        seq.block_table = self.pool.share(hit)
        seq.num_computed_tokens = computed
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """The runner has computed `out`: its tokens' K/V are in the cache. Call before finishing any of them."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            if seq.num_computed_tokens != s.start:
                raise RuntimeError(f"{seq} advanced twice for one step")
            seq.num_computed_tokens += s.num_tokens - len(s.draft)  # a draft counts once accepted
            if self.cfg.enable_prefix_caching:
                self._register_full_blocks(seq, s.start, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens and seq.seq_id in self._forks:
                self._fork(seq)

    def keep_draft_token(self, s: ScheduledSeq) -> None:
        """The next token of `s.draft` is the sequence's own (the engine appended it): its K/V, computed in
        the step, counts, and a block it fills joins the prefix cache, before anything can finish it."""
        seq = s.seq
        seq.num_computed_tokens += 1
        if self.cfg.enable_prefix_caching:
            self._register_full_blocks(seq, seq.num_computed_tokens - 1, seq.num_computed_tokens)

    def accept_draft(self, s: ScheduledSeq, accepted: int) -> None:
        """The engine kept the first `accepted` tokens of `s.draft` (keep_draft_token): blocks that held
        only rejected ones are freed."""
        seq = s.seq
        if seq.status is not SeqStatus.RUNNING:
            return
        if not 0 <= accepted <= len(s.draft) or \
                seq.num_computed_tokens != s.start + s.num_tokens - len(s.draft) + accepted:
            raise RuntimeError(f"{seq} cannot accept {accepted} of a {len(s.draft)}-token draft")
        seq.draft_misses = 0 if accepted else seq.draft_misses + 1
        seq.draft_pause = pause_after(seq.draft_misses)
        keep = self.pool.blocks_needed(seq.num_computed_tokens)
        if len(seq.block_table) > keep:
            self.pool.free(seq.block_table[keep:][::-1])
            del seq.block_table[keep:]

    # --- internals ----------------------------------------------------------------------------

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding its longest cached prefix of whole blocks, short of its last token."""
        if not self.cfg.enable_prefix_caching or seq.num_computed_tokens or seq.needs_prompt_logits:
            return []
        bs = self.pool.block_size
        hit = []
        for h in seq.block_hashes(bs, (seq.num_tokens - 1) // bs):
            block = self.pool.lookup(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def _register_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Put the blocks that this step's tokens [start, end) completed into the prefix cache."""
        bs = self.pool.block_size
        first, last = start // bs, end // bs
        if last > first:
            hashes = seq.block_hashes(bs, last)
            for i in range(first, last):
                self.pool.register(seq.block_table[i], hashes[i])

    def _seats_taken(self) -> int:
        return len(self.running) + sum(len(self._forks.get(s.seq_id, ())) for s in self.running)

    def _needs_copy(self, seq: Sequence) -> bool:
        """Its next token lands in a partly filled block that another sequence also reads."""
        start = seq.num_computed_tokens
        return start % self.pool.block_size != 0 and self.pool.ref_count(seq.block_table[-1]) > 1

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        end = seq.num_computed_tokens + n
        return max(0, self.pool.blocks_needed(end) - len(seq.block_table)) + self._needs_copy(seq)

    def _capacity(self, seq: Sequence) -> int:
        """How many new tokens fit in its own blocks plus the free ones."""
        usable = len(seq.block_table) + self.pool.num_free - self._needs_copy(seq)
        return max(0, usable * self.pool.block_size - seq.num_computed_tokens)

    def _victim(self, taken: set[int]) -> Sequence | None:
        """The running sequence to preempt next, of those not scheduled this step: the newest (FCFS),
        or the lowest-ranked (priority)."""
        if self.cfg.policy == "priority":
            return max((s for s in self.running if s.seq_id not in taken), key=_rank, default=None)
        return next((s for s in reversed(self.running) if s.seq_id not in taken), None)

    def _first_chunk(self, seq: Sequence, budget: int, rows: int) -> tuple[list[int], int, int]:
        """Were the waiting `seq` admitted now: its cached prefix's blocks, the tokens they hold, and the
        tokens of its first chunk."""
        hit = self._cached_prefix(seq)
        computed = len(hit) * self.pool.block_size
        return hit, computed, min(seq.num_tokens - computed, self._chunk_cap(budget),
                                  rows if seq.needs_prompt_logits else budget)

    def _chunk_cap(self, budget: int) -> int:
        """The most prompt tokens one sequence may take of what is left of the step's budget."""
        cap = self.cfg.long_prefill_token_threshold
        return min(budget, cap) if cap > 0 else budget

    def _blocks_short(self, hit: list[int], end: int, freed: frozenset[int] = frozenset()) -> int:
        """Free blocks missing for a sequence admitted with cached blocks `hit` to hold tokens [0, end),
        were the blocks `freed` freed first. The hit's evictable blocks count as free in the pool, but
        are not free for it."""
        room = self.pool.num_free + len(freed - set(hit)) - sum(self.pool.is_evictable(b) for b in hit)
        return self.pool.blocks_needed(end) - len(hit) - room

    def _preempt_for_first_waiting(self, out: SchedulerOutput) -> None:
        """Priority policy: when the first waiting sequence lacks a seat or the free blocks for its first
        chunk, preempt running sequences of a strictly lower priority for it, lowest-ranked first; none
        when all of them together would not make room (their work would be lost for nothing)."""
        if not self.waiting:
            return
        head = self.waiting[0]
        lower = sorted((s for s in self.running if s.params.priority > head.params.priority), key=_rank)

        def seats(seq: Sequence) -> int:
            return 1 + len(self._forks.get(seq.seq_id, ()))

        def fits(victims: list[Sequence]) -> bool:
            if self._seats_taken() - sum(map(seats, victims)) + seats(head) > self.cfg.max_num_seqs:
                return False
            hit, computed, n = self._first_chunk(head, self.cfg.max_num_batched_tokens, PROMPT_LOGIT_ROWS)
            short = self._blocks_short(hit, computed + n)
            if short <= 0 or short > sum(len(s.block_table) for s in victims):  # no need, or no way
                return short <= 0
            held = Counter(b for s in victims for b in s.block_table)
            freed = frozenset(b for b, refs in held.items() if self.pool.ref_count(b) == refs)  # no other holder
            return self._blocks_short(hit, computed + n, freed) <= 0

        if fits([]) or not fits(lower):
            return
        while lower and not fits([]):
            self._preempt(lower.pop(), out)

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        """FCFS: new sequences join the back of the queue, preempted ones the front (victims go newest
        first, so the oldest ends up in front). Priority: in rank order."""
        if self.cfg.policy == "priority":
            rank = _rank(seq)
            self.waiting.insert(next((i for i, s in enumerate(self.waiting) if _rank(s) > rank), len(self.waiting)),
                                seq)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def _make_room(self, seq: Sequence, n: int, taken: set[int], out: SchedulerOutput, allow_self: bool) -> bool:
        """Preempt running sequences (`_victim`) until `n` tokens of `seq` fit.

        False when they do not fit: then `seq` was preempted itself (allow_self) or it was newest.
        """
        while self._blocks_needed(seq, n) > self.pool.num_free:
            victim = self._victim(taken)
            if victim is None or (victim is seq and not allow_self):
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _take(self, seq: Sequence, n: int, taken: set[int], out: SchedulerOutput) -> None:
        """Give `seq` the blocks for its next `n` tokens (room is known to exist) and schedule them."""
        if self._needs_copy(seq):
            src = seq.block_table[-1]
            (dst,) = self.pool.allocate(1)
            out.block_copies.append((src, dst))
            self.pool.free([src])  # drop our reference; the other readers keep theirs
            seq.block_table[-1] = dst
        start = seq.num_computed_tokens
        more = self.pool.blocks_needed(start + n) - len(seq.block_table)
        if more > 0:
            seq.block_table.extend(self.pool.allocate(more))
        done = start + n == seq.num_tokens
        sample_for = [seq] + self._forks.get(seq.seq_id, []) if done else []
        out.scheduled.append(ScheduledSeq(seq, start, n, sample_for, seq.needs_prompt_logits))
        taken.add(seq.seq_id)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self._enqueue(seq, front=True)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _fork(self, parent: Sequence) -> None:
        for sib in self._forks.pop(parent.seq_id):
            sib.block_table = self.pool.share(parent.block_table)
            sib.num_computed_tokens = parent.num_computed_tokens
            sib.first_scheduled_time = parent.first_scheduled_time  # admitted with it: a later one is no first
            sib.num_cached_tokens = parent.num_cached_tokens
            sib.num_cache_write_tokens = parent.num_cache_write_tokens
            sib.prompt_logprobs = parent.prompt_logprobs  # complete: its prefill is done
            sib.status = SeqStatus.RUNNING
            self.running.append(sib)

    def _free_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            # tail first: cached tail blocks are evicted before the head blocks more prompts share
            self.pool.free(seq.block_table[::-1])
            seq.block_table = []


def _rank(seq: Sequence) -> tuple:
    """Priority policy: lower goes first (a request's choices rank together, parent first)."""
    return seq.params.priority, seq.arrival_time, seq.seq_id
