"""Automatic prefix caching: the pool's hash -> block map, and the scheduler reusing cached blocks.

The FakeRunner reads every sampling sequence's context back through its block table and checks
it, so a cached block holding the wrong tokens fails the step, not just the final comparison.
"""

from __future__ import annotations

import random

import pytest

from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.scheduler import Scheduler, SchedulerOutput
from glm4serve.engine.sequence import SeqStatus
from glm4serve.engine.types import SamplingParams
from glm4serve.engine.block_pool import BlockPool, NoFreeBlocks, hash_block
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, continuation, drive, make_seq, sched_config


def setup(num_blocks=64, block_size=4, **cfg):
    pool = BlockPool(num_blocks, block_size)
    cfg.setdefault("max_model_len", num_blocks * block_size)
    cfg.setdefault("max_num_batched_tokens", 64)
    sched = Scheduler(sched_config(block_size=block_size, **cfg), pool)
    return sched, pool, FakeRunner(num_blocks, block_size)


def tokens(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 60) for _ in range(length)]


def step(sched, runner) -> SchedulerOutput:
    """One step of `drive` without finishing anyone: every sampling sequence appends its argmax."""
    out = sched.schedule()
    logits = runner.run(out)
    sched.on_step_done(out)
    for s, row in zip([s for s in out.scheduled if s.sample_for], logits):
        for seq in s.sample_for:
            seq.output_token_ids.append(int(row.argmax()))
    return out


# --- pool ---------------------------------------------------------------------------------------


def test_chain_hash_depends_on_every_earlier_token():
    a, b = hash_block(b"", [1, 2]), hash_block(b"", [1, 3])
    assert a != b and hash_block(b"", [1, 2]) == a
    assert hash_block(a, [5, 6]) != hash_block(b, [5, 6])  # same block tokens, other prefix


def test_freed_registered_block_stays_cached_until_evicted_lru():
    pool = BlockPool(4, 2)
    x, y, z = pool.allocate(3)
    hx, hy = hash_block(b"", [1, 2]), hash_block(b"", [3, 4])
    assert pool.register(x, hx) and pool.register(y, hy)
    assert pool.lookup(hx) == x and pool.lookup(hy) == y and pool.num_cached == 2
    pool.free([y, x, z])  # y freed first: the least recently used
    assert pool.num_free == 4 and pool.num_used == 0
    assert pool.lookup(hx) == x and pool.lookup(hy) == y  # still cached though free
    assert pool.is_evictable(x) and not pool.is_evictable(z)

    # a hit takes a cached block back; it stops being evictable and free
    assert pool.share([x]) == [x] and pool.ref_count(x) == 1 and not pool.is_evictable(x)
    assert pool.num_free == 3

    # plain free blocks go first (z and the never-used one), then the LRU cached block, y
    first = pool.allocate(2)
    assert y not in first and pool.lookup(hy) == y and pool.num_evictions == 0
    assert pool.allocate(1) == [y]
    assert pool.lookup(hy) is None and pool.num_evictions == 1 and pool.num_cached == 1
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    pool.free([x])
    assert pool.allocate(1) == [x] and pool.lookup(hx) is None


def test_register_keeps_the_first_block_for_a_content_and_checks_its_inputs():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    h = hash_block(b"", [7, 7])
    assert pool.register(a, h) is True
    assert pool.register(a, h) is True  # again: a no-op
    assert pool.register(b, h) is False  # a duplicate computed at the same time: not cached
    assert pool.lookup(h) == a
    with pytest.raises(ValueError, match="other content"):
        pool.register(a, hash_block(b"", [8, 8]))
    pool.free([a, b])
    assert pool.is_evictable(a) and not pool.is_evictable(b)
    with pytest.raises(ValueError, match="not allocated"):
        pool.register(b, hash_block(b"", [9, 9]))
    with pytest.raises(ValueError, match="not allocated"):
        pool.share([b])  # a free block that holds nothing cached cannot be shared


def test_shared_cached_block_is_evictable_only_after_its_last_reader():
    pool = BlockPool(2, 2)
    (a,) = pool.allocate(1)
    pool.register(a, hash_block(b"", [1, 1]))
    pool.share([a])
    pool.free([a])
    assert not pool.is_evictable(a) and pool.num_free == 1
    pool.free([a])
    assert pool.is_evictable(a) and pool.num_free == 2


# --- scheduler ----------------------------------------------------------------------------------


def test_second_request_with_the_same_prefix_prefills_only_the_rest():
    sched, pool, runner = setup()
    shared = tokens(0, 8)  # two full blocks of 4
    a = make_seq(0, shared + tokens(1, 3))
    sched.add([a])
    drive(sched, runner, {0: 5})
    assert pool.num_free == pool.num_blocks and pool.num_cached == 3  # 11 + 4 tokens computed: 3 full blocks
    cached = [pool.lookup(h) for h in a.block_hashes(4, 2)]

    b = make_seq(1, shared + tokens(2, 5))
    sched.add([b])
    out = sched.schedule()
    (chunk,) = out.scheduled
    assert (chunk.start, chunk.num_tokens) == (8, 5)
    assert b.block_table[:2] == cached and [pool.ref_count(x) for x in cached] == [1, 1]
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (11 + 13, 8)
    runner.run(out)  # checks that b's context reads back right through the cached blocks
    sched.on_step_done(out)
    b.output_token_ids.append(11)
    drive(sched, runner, {1: 6})
    assert b.output_token_ids == [11] + continuation(b.prompt_token_ids + [11], 5)
    assert pool.num_free == pool.num_blocks


@pytest.mark.parametrize("length, start", [(8, 4), (9, 8), (4, 0), (1, 0)])
def test_a_fully_cached_prompt_still_computes_its_last_token_in_a_fresh_block(length, start):
    sched, pool, runner = setup()
    prompt = tokens(3, length)
    a = make_seq(0, prompt)
    sched.add([a])
    drive(sched, runner, {0: 1})
    old_blocks = [pool.lookup(h) for h in a.block_hashes(4, length // 4)]
    assert None not in old_blocks

    b = make_seq(1, prompt)
    sched.add([b])
    out = sched.schedule()
    (chunk,) = out.scheduled
    assert (chunk.start, chunk.num_tokens, chunk.sample_for) == (start, length - start, [b])
    assert out.block_copies == []
    # blocks at and after the first computed token are fresh: a cached block is never written into
    assert b.block_table[: start // 4] == old_blocks[: start // 4]
    assert not set(b.block_table[start // 4 :]) & set(old_blocks)
    assert all(pool.ref_count(x) == 0 and pool.is_evictable(x) for x in old_blocks[start // 4 :])
    runner.run(out)
    sched.on_step_done(out)
    if length % 4 == 0:  # b's recomputed copy of the last block is a duplicate: the old one stays cached
        assert pool.lookup(b.block_hashes(4, length // 4)[-1]) == old_blocks[-1]
    sched.finish(b, "stop")
    assert pool.num_free == pool.num_blocks


def test_cached_blocks_are_evicted_under_pressure_tail_first():
    sched, pool, runner = setup(num_blocks=6, max_model_len=24)
    a = make_seq(0, tokens(4, 16))  # 4 full blocks
    sched.add([a])
    drive(sched, runner, {0: 1})
    hashes = a.block_hashes(4, 4)
    assert all(pool.lookup(h) is not None for h in hashes) and pool.num_free == 6

    b = make_seq(1, tokens(5, 13))  # 4 blocks: the 2 plain ones and the 2 least recently freed
    sched.add([b])
    drive(sched, runner, {1: 2})
    assert pool.num_evictions == 2
    # a's blocks were freed tail first, so its head survives and still serves a shorter hit
    assert [pool.lookup(h) is not None for h in hashes] == [True, True, False, False]
    c = make_seq(2, a.prompt_token_ids[:10])
    sched.add([c])
    out = sched.schedule()
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (8, 2)
    runner.run(out)
    sched.on_step_done(out)
    sched.finish(c, "stop")
    assert pool.num_free == pool.num_blocks


def test_admission_does_not_count_its_own_cached_hit_as_free_room():
    sched, pool, runner = setup(num_blocks=5, max_model_len=20)
    prompt = tokens(6, 8)
    sched.add([make_seq(0, prompt)])
    drive(sched, runner, {0: 1})  # 2 cached blocks, evictable
    holder = make_seq(1, tokens(7, 3))  # takes 1 plain block and keeps it while it decodes
    sched.add([holder])
    step(sched, runner)
    b = make_seq(2, prompt + tokens(8, 12))  # hits 2 blocks and needs 3 more: 4 count as free, 2 really are
    sched.add([b])
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == [holder] and b.status is SeqStatus.WAITING
    assert b.block_table == [] and pool.num_used == 1 and pool.num_free == 4  # nothing taken while it waits
    runner.run(out)
    sched.on_step_done(out)
    sched.finish(holder, "stop")
    out = sched.schedule()  # now it fits
    assert [(c.seq, c.start, c.num_tokens) for c in out.scheduled] == [(b, 8, 12)]


def test_preempted_sequence_recomputes_only_past_its_cached_blocks():
    sched, pool, runner = setup(num_blocks=8, max_model_len=32)
    s = make_seq(0, tokens(9, 6))
    sched.add([s])
    while s.num_output_tokens < 4:
        step(sched, runner)
    sched._preempt(s, SchedulerOutput())
    assert s.block_table == [] and pool.num_free == pool.num_blocks
    out = sched.schedule()
    (chunk,) = out.scheduled
    # 10 tokens, 9 computed before: blocks 0 and 1 (tokens 0..7) are found again, outputs included
    assert (chunk.start, chunk.num_tokens, chunk.sample_for) == (8, 2, [s])
    assert s.num_cached_tokens == 0  # what its first admission found: its re-admission's hit is its own work
    logits = runner.run(out)
    assert int(logits[0].argmax()) == continuation(s.prompt_token_ids, 5)[-1]


def test_n_choices_fork_over_a_cached_prefix():
    sched, pool, runner = setup()
    shared = tokens(10, 8)
    sched.add([make_seq(0, shared + tokens(11, 2))])
    drive(sched, runner, {0: 2})
    seqs = [make_seq(1 + i, shared + tokens(12, 3), request_id="n", index=i) for i in range(3)]
    sched.add(seqs)
    out = sched.schedule()
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (8, 3)
    drive(sched, runner, {s.seq_id: 6 for s in seqs})
    assert [s.num_cached_tokens for s in seqs] == [8, 8, 8]
    for s in seqs:
        assert s.output_token_ids == continuation(s.prompt_token_ids, 6)
    assert pool.num_free == pool.num_blocks


def run_shared_prefix_workload(num_blocks: int, caching: bool, seed: int = 0):
    rng = random.Random(seed)
    sched, pool, runner = setup(num_blocks=num_blocks, max_num_batched_tokens=24, max_model_len=48,
                                max_num_seqs=8, enable_prefix_caching=caching)
    stems = [tokens(100 + i, rng.choice((4, 8, 12, 16))) for i in range(3)]
    seqs, limits, sid = [], {}, 0
    for r in range(14):
        prompt = rng.choice(stems) + tokens(200 + r, rng.randint(0, 6))
        n = rng.choice((1, 1, 2, 3))
        group = [make_seq(sid + i, prompt, request_id=f"q{r}", index=i) for i in range(n)]
        sid += n
        for s in group:
            limits[s.seq_id] = rng.randint(1, 12)
        seqs += group
        sched.add(group)
    drive(sched, runner, limits)
    assert pool.num_free == pool.num_blocks and not sched.has_work
    for s in seqs:  # the fake model is greedy and deterministic: every choice has the one answer
        assert s.output_token_ids == continuation(s.prompt_token_ids, limits[s.seq_id])
    return sched, pool


@pytest.mark.parametrize("seed", range(4))
def test_shared_prefixes_under_a_tiny_pool_with_forks_preemption_and_eviction(seed):
    roomy, _ = run_shared_prefix_workload(200, caching=True, seed=seed)
    off, off_pool = run_shared_prefix_workload(14, caching=False, seed=seed)
    tight, tight_pool = run_shared_prefix_workload(14, caching=True, seed=seed)
    assert roomy.prefix_cache_hits > 0 and roomy.num_preemptions == 0
    assert tight.num_preemptions > 0 and tight_pool.num_evictions > 0 and tight.prefix_cache_hits > 0
    assert off.prefix_cache_queries == off.prefix_cache_hits == 0 and off_pool.num_cached == 0


def test_engine_reports_prefix_cache_stats():
    pool = BlockPool(64, 4)
    engine = LLMEngine(FakeRunner(64, 4), FakeTokenizer(), sched_config(block_size=4, max_model_len=256), pool,
                       FakeTokenizer.stop_token_ids, vocab_size=VOCAB)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = tokens(13, 10)
    outs = {}
    for rid in ("a", "b"):
        engine.add_request(rid, prompt, params)
        while engine.has_work:
            outs.setdefault(rid, []).extend(engine.step())
    cached = {rid: {o.num_cached_tokens for o in found} for rid, found in outs.items()}
    assert cached == {"a": {0}, "b": {8}}  # every Output of a request reports its prompt's hit
    assert {o.num_cache_write_tokens for o in outs["a"]} == {8} and {o.num_cache_write_tokens for o in outs["b"]} == {0}
    st = engine.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (20, 8)
    assert st.kv_blocks_used == 0 and pool.num_free == pool.num_blocks
    # a prompt of whole blocks, again: its last block is recomputed (one token must be), not written anew
    for rid in ("c", "d"):
        engine.add_request(rid, tokens(21, 12), params)
        while engine.has_work:
            outs.setdefault(rid, []).extend(engine.step())
    assert {o.num_cached_tokens for o in outs["d"]} == {8}
    writes = {rid: {o.num_cache_write_tokens for o in outs[rid]} for rid in ("c", "d")}
    assert writes == {"c": {12}, "d": {0}}


def test_a_cache_salt_keeps_a_prompts_blocks_to_requests_with_the_same_salt():
    """vLLM's cache_salt: the same prompt is cached apart per salt, and apart from unsalted requests."""
    engine = LLMEngine(FakeRunner(64, 4), FakeTokenizer(), sched_config(block_size=4, max_model_len=256),
                       BlockPool(64, 4), FakeTokenizer.stop_token_ids, vocab_size=VOCAB)
    prompt = tokens(17, 10)
    cached = {}
    for rid, salt in (("a1", "tenant-a"), ("a2", "tenant-a"), ("b1", "tenant-b"), ("plain1", None),
                      ("plain2", None), ("b2", "tenant-b")):
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, cache_salt=salt))
        while engine.has_work:
            for o in engine.step():
                cached[rid] = o.num_cached_tokens
    assert cached == {"a1": 0, "a2": 8, "b1": 0, "plain1": 0, "plain2": 8, "b2": 8}
