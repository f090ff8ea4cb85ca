"""Scheduler: continuous batching, chunked prefill, preemption, n>1 forks, over a fake paged cache."""

from __future__ import annotations

import random

import pytest

from glm4serve.engine.scheduler import Scheduler
from glm4serve.engine.sequence import SeqStatus
from glm4serve.engine.block_pool import BlockPool
from tests.engine_fakes import FakeRunner, continuation, drive, make_seq, sched_config


def setup(num_blocks=64, block_size=4, **cfg):
    pool = BlockPool(num_blocks, block_size)
    cfg.setdefault("max_model_len", num_blocks * block_size)
    sched = Scheduler(sched_config(block_size=block_size, **cfg), pool)
    return sched, pool, FakeRunner(num_blocks, block_size)


def prompt_of(i: int, length: int) -> list[int]:
    return [10 + (i * 7 + j * 3) % 50 for j in range(length)]


def test_one_sequence_prefills_then_decodes():
    sched, pool, runner = setup(max_num_batched_tokens=64)
    seq = make_seq(0, prompt_of(0, 10))
    sched.add([seq])
    out = sched.schedule()
    assert [(s.seq, s.start, s.num_tokens) for s in out.scheduled] == [(seq, 0, 10)]
    assert out.scheduled[0].sample_for == [seq]
    assert len(seq.block_table) == 3 and pool.num_used == 3  # 10 tokens in blocks of 4
    drive(sched, runner, {0: 5})
    assert seq.output_token_ids == continuation(seq.prompt_token_ids, 5)
    assert seq.status is SeqStatus.FINISHED and pool.num_free == pool.num_blocks


def test_new_requests_join_while_others_decode():
    sched, pool, runner = setup(max_num_batched_tokens=64)
    a = make_seq(0, prompt_of(0, 6))
    sched.add([a])
    for _ in range(3):
        out = sched.schedule()
        runner.run(out)
        sched.on_step_done(out)
        a.output_token_ids.append(continuation(a.all_token_ids, 1)[0])
    b = make_seq(1, prompt_of(1, 9))
    sched.add([b])
    out = sched.schedule()
    assert [(s.seq, s.start, s.num_tokens) for s in out.scheduled] == [(a, 8, 1), (b, 0, 9)]
    assert sched.num_running == 2 and sched.num_waiting == 0


def test_long_prompt_is_chunked_and_never_stalls_decodes():
    budget = 16
    sched, pool, runner = setup(num_blocks=128, max_num_batched_tokens=budget)
    short = [make_seq(i, prompt_of(i, 5)) for i in range(3)]
    for s in short:
        sched.add([s])
    long = make_seq(9, prompt_of(9, 100))
    steps_seen = []

    def check(step, out):
        assert out.num_tokens <= budget
        if step == 1:
            sched.add([long])
        by_seq = {s.seq.seq_id: s for s in out.scheduled}
        if long.seq_id in by_seq and by_seq[long.seq_id].start < 100:
            # every decoder got its token this step; the long prompt took exactly the leftover
            assert all(by_seq[s.seq_id].num_tokens == 1 for s in short if not s.is_finished)
            chunk = by_seq[long.seq_id]
            assert chunk.num_tokens == min(budget - (len(by_seq) - 1), 100 - chunk.start)
            assert chunk.sample_for == ([long] if chunk.start + chunk.num_tokens == 100 else [])
            steps_seen.append(chunk.num_tokens)

    drive(sched, runner, {0: 30, 1: 30, 2: 30, 9: 3}, on_step=check)
    assert sum(steps_seen) == 100 and len(steps_seen) == 8  # 13 tokens a step beside 3 decodes
    assert long.output_token_ids == continuation(long.prompt_token_ids, 3)
    for s in short:
        assert s.output_token_ids == continuation(s.prompt_token_ids, 30)


def test_long_prefill_threshold_caps_each_prompts_chunk():
    """vLLM's long_prefill_token_threshold: each prompt takes at most that many tokens a step, a running
    one's next chunk and a new one's first alike, while the decodes beside them keep their token a step;
    the step's budget still bounds the whole."""
    sched, pool, runner = setup(num_blocks=128, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    short = [make_seq(i, prompt_of(i, 5)) for i in range(2)]
    for s in short:
        sched.add([s])
    out = sched.schedule()  # two 5-token prompts: under the threshold, whole
    assert [s.num_tokens for s in out.scheduled] == [5, 5]
    runner.run(out)
    sched.on_step_done(out)
    for s in short:
        s.output_token_ids.append(continuation(s.all_token_ids, 1)[0])
    longs = [make_seq(8, prompt_of(8, 30)), make_seq(9, prompt_of(9, 30))]
    chunks: dict[int, list[int]] = {8: [], 9: []}

    def check(step, out):
        assert out.num_tokens <= 16
        if step == 0:
            for s in longs:
                sched.add([s])
        by_seq = {s.seq.seq_id: s for s in out.scheduled}
        for s in short:
            if not s.is_finished:
                assert by_seq[s.seq_id].num_tokens == 1
        for seq_id, c in chunks.items():
            if seq_id in by_seq and by_seq[seq_id].start < 30:
                assert by_seq[seq_id].num_tokens <= 8
                c.append(by_seq[seq_id].num_tokens)

    drive(sched, runner, {0: 12, 1: 12, 8: 2, 9: 2}, on_step=check)
    # the first long prompt 8 a step; the second what the budget of 16 leaves beside 2 decodes and it, up to 8
    assert chunks[8] == [8, 8, 8, 6]
    assert chunks[9] == [6, 6, 6, 8, 4]
    for s in longs:
        assert s.output_token_ids == continuation(s.prompt_token_ids, 2)
    assert pool.num_free == pool.num_blocks


def test_without_a_threshold_a_prompt_takes_the_whole_budget():
    sched, pool, runner = setup(num_blocks=128, max_num_batched_tokens=20)
    seq = make_seq(0, prompt_of(0, 30))
    sched.add([seq])
    assert [s.num_tokens for s in sched.schedule().scheduled] == [20]


def test_budget_and_seat_limits_hold_under_random_load():
    rng = random.Random(0)
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=24, max_num_seqs=5)
    seqs = [make_seq(i, prompt_of(i, rng.randint(1, 40))) for i in range(20)]
    limits = {s.seq_id: rng.randint(1, 12) for s in seqs}
    for s in seqs:
        sched.add([s])

    def check(step, out):
        assert out.num_tokens <= 24
        assert len(out.scheduled) <= 5 and sched.num_running <= 5
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)

    drive(sched, runner, limits, on_step=check)
    for s in seqs:
        assert s.output_token_ids == continuation(s.prompt_token_ids, limits[s.seq_id])
    assert pool.num_free == pool.num_blocks


def run_workload(num_blocks: int, block_size: int = 4, n_req: int = 10):
    sched, pool, runner = setup(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=32,
                                max_model_len=40)
    seqs = [make_seq(i, prompt_of(i, 5 + i % 7)) for i in range(n_req)]
    limits = {s.seq_id: 12 + (s.seq_id * 5) % 17 for s in seqs}
    for s in seqs:
        sched.add([s])
    drive(sched, runner, limits)
    return sched, pool, {s.seq_id: s.output_token_ids for s in seqs}


def test_preemption_with_a_tiny_pool_gives_the_same_outputs():
    big_sched, big_pool, big = run_workload(num_blocks=200)
    assert big_sched.num_preemptions == 0
    small_sched, small_pool, small = run_workload(num_blocks=10)  # 40 token slots for 10 requests
    assert small_sched.num_preemptions > 0
    assert small == big
    assert small_pool.num_free == small_pool.num_blocks


def test_preemption_takes_the_newest_and_requeues_it_in_front():
    sched, pool, runner = setup(num_blocks=6, block_size=4, max_num_batched_tokens=64, max_model_len=24)
    a, b = make_seq(0, prompt_of(0, 8)), make_seq(1, prompt_of(1, 8))  # 2 full blocks each
    c = make_seq(2, prompt_of(2, 3))
    for s in (a, b):
        sched.add([s])
    out = sched.schedule()
    runner.run(out)
    sched.on_step_done(out)
    for s in (a, b):
        s.output_token_ids.append(11)
    sched.add([c])  # waits: 2 free blocks left, but each decode needs one
    out = sched.schedule()
    assert out.preempted == [] and [s.seq for s in out.scheduled] == [a, b]
    runner.run(out)
    sched.on_step_done(out)
    for s in (a, b):
        s.output_token_ids += [12, 13, 14, 15]  # fill their third block, as four decodes would
        s.num_computed_tokens += 4
    out = sched.schedule()  # both need a fourth block, none is free: b (newest) makes room for a
    assert out.preempted == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert b.status is SeqStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]
    assert sched.num_preemptions == 1


def test_recompute_after_preemption_covers_prompt_and_outputs():
    # without prefix caching (with it, the full blocks are found again: test_prefix_cache.py)
    sched, pool, runner = setup(num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32,
                                enable_prefix_caching=False)
    s = make_seq(0, prompt_of(0, 6))
    sched.add([s])
    while s.num_output_tokens < 4:
        out = sched.schedule()
        logits = runner.run(out)
        sched.on_step_done(out)
        s.output_token_ids.append(int(logits[0].argmax()))
    sched._preempt(s, type(out)())
    out = sched.schedule()
    (chunk,) = out.scheduled
    assert (chunk.start, chunk.num_tokens, chunk.sample_for) == (0, 10, [s])
    assert chunk.token_ids == s.all_token_ids
    logits = runner.run(out)
    assert int(logits[0].argmax()) == continuation(s.prompt_token_ids, 5)[-1]


def test_abort_half_of_sixteen_running_frees_their_blocks():
    sched, pool, runner = setup(num_blocks=128, max_num_batched_tokens=256)
    seqs = [make_seq(i, prompt_of(i, 9)) for i in range(16)]
    for s in seqs:
        sched.add([s])
    for _ in range(3):
        out = sched.schedule()
        logits = runner.run(out)
        sched.on_step_done(out)
        for chunk, row in zip(out.scheduled, logits):
            chunk.seq.output_token_ids.append(int(row.argmax()))
    assert sched.num_running == 16 and pool.num_used == 16 * 3
    for s in seqs[::2]:
        aborted = sched.abort(s.request_id)
        assert aborted == [s] and s.finish_reason == "abort" and s.block_table == []
    assert sched.num_running == 8
    assert pool.num_used == sum(len(s.block_table) for s in seqs[1::2]) == 8 * 3
    assert sched.abort("r0") == []  # twice: nothing left
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == seqs[1::2]
    for s in seqs[1::2]:
        sched.finish(s, "stop")
    assert pool.num_free == pool.num_blocks and not sched.has_work


def test_abort_of_waiting_request_and_of_unforked_choices():
    sched, pool, runner = setup(num_blocks=16, max_num_batched_tokens=8, max_model_len=64)
    a = make_seq(0, prompt_of(0, 20))
    sibs = [make_seq(1 + i, prompt_of(0, 20), request_id="n", index=i) for i in range(3)]
    sched.add([a])
    sched.add(sibs)
    assert sched.num_waiting == 4
    out = sched.schedule()  # a takes the whole budget
    assert [c.seq for c in out.scheduled] == [a]
    assert sched.abort("n") == sibs and sched.num_waiting == 0
    assert all(s.status is SeqStatus.FINISHED for s in sibs)
    sched.abort("r0")
    assert pool.num_free == pool.num_blocks and not sched.has_work


def test_abort_of_one_choice_frees_its_own_blocks_and_leaves_its_siblings_decoding():
    sched, pool, runner = setup(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    prompt = prompt_of(2, 8)
    seqs = [make_seq(i, prompt, request_id="req", index=i) for i in range(3)]
    sched.add(seqs)
    for _ in range(3):  # the prompt, then two tokens each: every choice owns its third block
        out = sched.schedule()
        runner.run(out)
        sched.on_step_done(out)
        for s in seqs:
            s.output_token_ids.append(continuation(s.all_token_ids, 1)[0])
    shared, own = seqs[0].block_table[:2], [s.block_table[2] for s in seqs]
    assert len(set(own)) == 3 and [pool.ref_count(b) for b in shared] == [3, 3]
    assert sched.abort("req", index=1) == [seqs[1]] and seqs[1].finish_reason == "abort"
    assert pool.ref_count(own[1]) == 0 and [pool.ref_count(b) for b in shared] == [2, 2]
    assert sched.abort("req", index=1) == []  # twice: nothing left of it
    assert "req" in sched and sched.num_running == 2
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == [seqs[0], seqs[2]]
    assert sched.abort("req") == [seqs[0], seqs[2]]
    assert pool.num_free == pool.num_blocks and "req" not in sched


def test_n_choices_share_prompt_blocks_and_copy_the_partial_one():
    sched, pool, runner = setup(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    prompt = prompt_of(3, 10)  # blocks: 4 + 4 + 2 (partial)
    seqs = [make_seq(i, prompt, request_id="req", index=i) for i in range(3)]
    sched.add(seqs)
    out = sched.schedule()
    (chunk,) = out.scheduled
    assert chunk.seq is seqs[0] and chunk.num_tokens == 10 and chunk.sample_for == seqs
    assert seqs[1].block_table == [] and pool.num_used == 3  # only choice 0 prefills
    runner.run(out)
    sched.on_step_done(out)
    table = list(seqs[0].block_table)
    for s in seqs:
        assert s.block_table == table and s.num_computed_tokens == 10 and s.status is SeqStatus.RUNNING
        s.output_token_ids.append(20 + s.index)  # each choice sampled its own first token
    assert [pool.ref_count(b) for b in table] == [3, 3, 3] and pool.num_used == 3

    out = sched.schedule()
    # the first two writers of the shared partial block copy it; the last one owns it
    assert [c.seq for c in out.scheduled] == seqs
    assert out.block_copies == [(table[2], seqs[0].block_table[2]), (table[2], seqs[1].block_table[2])]
    assert seqs[2].block_table[2] == table[2]
    assert len({s.block_table[2] for s in seqs}) == 3
    assert [pool.ref_count(b) for b in table[:2]] == [3, 3] and pool.ref_count(table[2]) == 1
    assert all(s.block_table[:2] == table[:2] for s in seqs)
    runner.run(out)  # the fake cache checks each choice reads prompt + its own token
    sched.on_step_done(out)

    for s in seqs:
        sched.finish(s, "stop")
    assert pool.num_free == pool.num_blocks


def test_n_choices_with_block_aligned_prompt_need_no_copy_and_match_n1():
    sched, pool, runner = setup(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    prompt = prompt_of(5, 8)
    seqs = [make_seq(i, prompt, request_id="req", index=i) for i in range(4)]
    sched.add(seqs)
    copies = []
    drive(sched, runner, {s.seq_id: 6 for s in seqs}, on_step=lambda i, out: copies.extend(out.block_copies))
    assert copies == []
    for s in seqs:  # greedy fake model: every choice equals the single-choice answer
        assert s.output_token_ids == continuation(prompt, 6)
    assert pool.num_free == pool.num_blocks


def test_n_choices_survive_preemption_in_a_tiny_pool():
    prompt = prompt_of(1, 9)
    results = {}
    for num_blocks in (64, 9):
        sched, pool, runner = setup(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32,
                                    max_model_len=36)
        seqs = [make_seq(i, prompt, request_id="req", index=i) for i in range(4)]
        other = make_seq(9, prompt_of(2, 7))
        sched.add(seqs)
        sched.add([other])
        drive(sched, runner, {**{s.seq_id: 10 + s.index for s in seqs}, 9: 15})
        results[num_blocks] = [s.output_token_ids for s in seqs + [other]], sched.num_preemptions
        assert pool.num_free == pool.num_blocks
    assert results[64][1] == 0 and results[9][1] > 0
    assert results[9][0] == results[64][0]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_choices_readmitted_after_preemption_keep_their_first_admissions_counts(prefix_caching):
    # A fork re-admitted after preemption is not a first admission: the prompt's cache counts stay
    # those of the request's (recomputing its own output tokens is no prompt cache hit).
    sched, pool, runner = setup(num_blocks=9, block_size=4, max_num_batched_tokens=32, max_model_len=36,
                                enable_prefix_caching=prefix_caching)
    seqs = [make_seq(i, prompt_of(1, 9), request_id="req", index=i) for i in range(4)]
    sched.add(seqs)
    sched.add([make_seq(9, prompt_of(2, 7))])
    drive(sched, runner, {**{s.seq_id: 10 + s.index for s in seqs}, 9: 15})
    assert sched.num_preemptions > 0
    assert {(s.num_cached_tokens, s.num_cache_write_tokens, s.first_scheduled_time) for s in seqs} == {
        (seqs[0].num_cached_tokens, seqs[0].num_cache_write_tokens, seqs[0].first_scheduled_time)}
    assert seqs[0].num_cached_tokens == 0 and seqs[0].num_cache_write_tokens == (8 if prefix_caching else 0)


def test_admission_is_fifo_and_respects_max_num_seqs():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=3)
    seqs = [make_seq(i, prompt_of(i, 4)) for i in range(5)]
    for s in seqs:
        sched.add([s])
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == seqs[:3]
    assert list(sched.waiting) == seqs[3:]
    runner.run(out)
    sched.on_step_done(out)
    sched.finish(seqs[1], "stop")
    for s in (seqs[0], seqs[2]):
        s.output_token_ids.append(11)
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == [seqs[0], seqs[2], seqs[3]]


def test_fork_seats_count_against_max_num_seqs():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=4)
    a = make_seq(0, prompt_of(0, 4))
    n3 = [make_seq(1 + i, prompt_of(1, 4), request_id="n3", index=i) for i in range(3)]
    sched.add([a])
    sched.add(n3)
    out = sched.schedule()
    assert [c.seq for c in out.scheduled] == [a, n3[0]]  # 1 + 3 seats = 4
    b = make_seq(9, prompt_of(9, 4))
    sched.add([b])
    out2 = sched.schedule()
    assert b not in [c.seq for c in out2.scheduled]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_choices_past_max_num_seqs_run_in_groups_of_at_most_that_many(prefix_caching):
    # vLLM serves n past its max_num_seqs: here n=5 over 2 seats is three groups, one after another
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=2,
                                enable_prefix_caching=prefix_caching)
    prompt = prompt_of(1, 10)
    n5 = [make_seq(i, prompt, request_id="n5", index=i) for i in range(5)]
    sched.add(n5)
    assert sched.num_waiting == 5 and sched.seqs_of("n5") == n5
    prefills = []

    def check(step, out):
        assert sched.num_running <= 2
        prefills.extend(s.seq for s in out.scheduled if s.start < len(prompt))

    drive(sched, runner, {i: 3 for i in range(5)}, on_step=check)
    assert prefills == [n5[0], n5[2], n5[4]]  # each group's first choice prefills for its group
    assert all(s.output_token_ids == continuation(prompt, 3) for s in n5)
    assert [s.num_cached_tokens for s in n5] == [0, 0] + [8 if prefix_caching else 0] * 3
    assert pool.num_free == pool.num_blocks and sched.num_requests == 0


def test_aborting_a_request_of_several_groups_frees_them_all():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=2)
    n5 = [make_seq(i, prompt_of(1, 10), request_id="n5", index=i) for i in range(5)]
    sched.add(n5)
    runner.run(out := sched.schedule())
    sched.on_step_done(out)
    assert sched.abort("n5") == n5
    assert all(s.status is SeqStatus.FINISHED for s in n5) and not sched.has_work and sched.num_waiting == 0
    assert pool.num_free == pool.num_blocks


def test_rejects_bad_requests_and_configs():
    sched, pool, runner = setup(num_blocks=8, block_size=4, max_model_len=20)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add([make_seq(0, prompt_of(0, 21))])
    with pytest.raises(ValueError, match="empty"):
        sched.add([make_seq(1, [])])
    sched.add([make_seq(2, prompt_of(0, 20))])  # exactly max_model_len is accepted
    with pytest.raises(ValueError, match="already"):
        sched.add([make_seq(3, prompt_of(0, 3), request_id="r2")])
    with pytest.raises(ValueError, match="KV cache holds 32 tokens"):
        Scheduler(sched_config(max_model_len=33, block_size=4), BlockPool(8, 4))
    with pytest.raises(ValueError, match="block size"):
        Scheduler(sched_config(max_model_len=16, block_size=8), BlockPool(8, 4))


# ---- the priority policy ------------------------------------------------------------------------

def step(sched, runner, token=11):
    """One scheduled step run; every sampling sequence gets `token`."""
    out = sched.schedule()
    runner.run(out)
    sched.on_step_done(out)
    for s in out.scheduled:
        for seq in s.sample_for:
            seq.output_token_ids.append(token)
    return out


def tiny_priority_pool():
    """Six blocks of four tokens."""
    return setup(num_blocks=6, block_size=4, max_num_batched_tokens=64, max_model_len=24, scheduling_policy="priority")


def admit(sched, runner, *seqs):
    """Queue each sequence as a request of its own and run one step."""
    for s in seqs:
        sched.add([s])
    return step(sched, runner)


def test_priority_admits_by_priority_then_arrival():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=1,
                                scheduling_policy="priority")
    seqs = [make_seq(i, prompt_of(i, 4), priority=p) for i, p in enumerate([5, 1, 0, 1])]
    for s in seqs:
        sched.add([s])
    assert list(sched.waiting) == [seqs[2], seqs[1], seqs[3], seqs[0]]
    admitted = []
    for _ in range(4):
        out = step(sched, runner)
        admitted += [c.seq for c in out.scheduled if c.start == 0]
        sched.finish(out.scheduled[0].seq, "stop")
    assert admitted == [seqs[2], seqs[1], seqs[3], seqs[0]]
    assert pool.num_free == pool.num_blocks


def test_fcfs_keeps_arrival_order_whatever_the_priority_field():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=1)
    seqs = [make_seq(i, prompt_of(i, 4), priority=p) for i, p in enumerate([5, 0])]
    for s in seqs:
        sched.add([s])
    assert list(sched.waiting) == seqs


def test_a_higher_priority_request_preempts_the_lowest_ranked_running_one_for_a_seat():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=2,
                                scheduling_policy="priority")
    old, new = make_seq(0, prompt_of(0, 6), priority=3), make_seq(1, prompt_of(1, 6), priority=3)
    admit(sched, runner, old, new)
    urgent = make_seq(2, prompt_of(2, 5), priority=-1)
    sched.add([urgent])
    out = sched.schedule()
    assert out.preempted == [new]  # of equal priority, the newer one
    assert [c.seq for c in out.scheduled] == [old, urgent]
    assert new.status is SeqStatus.WAITING and new.block_table == [] and list(sched.waiting) == [new]


def test_equal_or_lower_priority_waits_for_a_seat():
    for priority in (0, 7):
        sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=100, max_num_seqs=1,
                                    scheduling_policy="priority")
        running = make_seq(0, prompt_of(0, 6), priority=0)
        admit(sched, runner, running)
        later = make_seq(1, prompt_of(1, 6), priority=priority)
        sched.add([later])
        out = sched.schedule()
        assert out.preempted == [] and [c.seq for c in out.scheduled] == [running]
        assert list(sched.waiting) == [later]


def test_a_higher_priority_request_preempts_for_blocks_and_the_victim_waits_behind_it():
    sched, pool, runner = tiny_priority_pool()
    low = make_seq(0, prompt_of(0, 16), priority=1)  # 4 of the 6 blocks
    admit(sched, runner, low)
    high = make_seq(1, prompt_of(1, 12), priority=0)  # needs 3 blocks, 2 are free
    sched.add([high])
    out = sched.schedule()
    assert out.preempted == [low] and [c.seq for c in out.scheduled] == [high]
    assert list(sched.waiting) == [low]


def test_a_sequence_preempted_for_a_higher_priority_is_not_readmitted_in_the_same_step():
    # the step's budget leaves 4 tokens after the urgent prompt: readmitting the victim there would throw its
    # computed tokens away and recompute them at once
    sched, pool, runner = setup(num_blocks=6, block_size=4, max_num_batched_tokens=20, max_model_len=24,
                                scheduling_policy="priority", enable_prefix_caching=False)
    low = make_seq(0, prompt_of(0, 12), priority=1)  # 3 of the 6 blocks, then a 4th for its next token
    admit(sched, runner, low)
    high = make_seq(1, prompt_of(1, 16), priority=0)  # needs 4 blocks, 3 are free
    sched.add([high])
    out = sched.schedule()
    assert out.preempted == [low] and [(c.seq, c.num_tokens) for c in out.scheduled] == [(high, 16)]
    assert list(sched.waiting) == [low] and low.block_table == []


def test_a_finished_waiting_parent_leaves_its_place_in_the_queue_to_its_first_sibling():
    sched, pool, runner = setup(num_blocks=64, max_num_batched_tokens=64, max_num_seqs=2)
    x = [make_seq(i, prompt_of(0, 3), request_id="x", index=i) for i in range(2)]
    sched.add(x)
    step(sched, runner)  # x's two choices take both seats
    y = make_seq(2, prompt_of(1, 2), request_id="y")
    a = [make_seq(3 + i, prompt_of(2, 2), request_id="a", index=i) for i in range(4)]  # groups [a0, a1], [a2, a3]
    sched.add([y])
    sched.add(a)
    assert list(sched.waiting) == [y, a[0], a[2]]
    sched.finish(a[2], "abort")
    assert list(sched.waiting) == [y, a[0], a[3]]  # not ahead of y, which came first


def test_room_is_made_by_preempting_the_lowest_priority_not_the_newest():
    sched, pool, runner = tiny_priority_pool()
    low, high = make_seq(0, prompt_of(0, 8), priority=2), make_seq(1, prompt_of(1, 8), priority=0)
    admit(sched, runner, low, high)
    step(sched, runner)
    for s in (low, high):
        s.output_token_ids += [12, 13, 14]  # fill their third block, as three decodes would
        s.num_computed_tokens += 3
    out = sched.schedule()  # both need a fourth block and none is free
    assert out.preempted == [low]  # FCFS would take high, the newest
    assert [c.seq for c in out.scheduled] == [high]


def test_priorities_under_preemption_in_a_tiny_pool_give_the_same_outputs():
    priorities = [random.Random(3).randint(0, 3) for _ in range(12)]

    def run(num_blocks, policy):
        sched, pool, runner = setup(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32,
                                    max_model_len=40, max_num_seqs=4, scheduling_policy=policy)
        seqs = [make_seq(i, prompt_of(i, 5 + i % 7), priority=p) for i, p in enumerate(priorities)]
        limits = {s.seq_id: 12 + (s.seq_id * 5) % 17 for s in seqs}
        for s in seqs[:6]:
            sched.add([s])

        def arrive(i, out):  # the other six come while the first decode
            if i == 2:
                for s in seqs[6:]:
                    sched.add([s])

        drive(sched, runner, limits, on_step=arrive)
        assert pool.num_free == pool.num_blocks
        return sched, {s.seq_id: s.output_token_ids for s in seqs}

    _, expected = run(200, "fcfs")
    sched, outputs = run(10, "priority")
    assert sched.num_preemptions > 0
    assert outputs == expected


def test_no_lower_priority_work_is_lost_when_preempting_it_would_not_make_room():
    sched, pool, runner = tiny_priority_pool()
    high, low = make_seq(0, prompt_of(0, 14), priority=0), make_seq(1, prompt_of(1, 6), priority=5)
    admit(sched, runner, high, low)  # 4 + 2 blocks: the pool is full, with room in them for the next decodes
    middle = make_seq(2, prompt_of(2, 20), priority=1)  # 5 blocks: low's 2 would not do
    sched.add([middle])
    out = sched.schedule()
    assert low not in out.preempted and low.status is SeqStatus.RUNNING
    assert list(sched.waiting)[0] is middle


def test_a_higher_priority_decode_takes_room_from_a_lower_one_admitted_before_it():
    sched, pool, runner = setup(num_blocks=4, max_num_batched_tokens=64, max_model_len=16, scheduling_policy="priority")
    low, high = make_seq(0, prompt_of(0, 6), priority=5), make_seq(1, prompt_of(1, 8), priority=0)
    admit(sched, runner, low)
    admit(sched, runner, high)  # the pool is full; high's next token needs a block
    out = sched.schedule()
    assert out.preempted == [low] and [c.seq for c in out.scheduled] == [high]  # FCFS would preempt high


def test_a_higher_priority_prefill_under_way_takes_room_from_a_lower_decode():
    sched, pool, runner = setup(num_blocks=8, max_num_batched_tokens=8, max_model_len=32,
                                scheduling_policy="priority", enable_prefix_caching=False)
    low = make_seq(0, prompt_of(0, 7), priority=5)
    admit(sched, runner, low)
    high = make_seq(1, prompt_of(1, 24), priority=0)  # 6 blocks, in chunks of 8 tokens
    sched.add([high])
    steps = 0
    while high.is_prefilling or high.num_computed_tokens < high.num_prompt_tokens:
        out = step(sched, runner)
        assert high in [c.seq for c in out.scheduled]  # never waits on a lower-priority decode
        steps += 1
    assert steps == 4  # 7 tokens beside low's decode in the step it was admitted, then 8, 8 and 1


def test_the_outrank_check_counts_a_prefix_cache_hit():
    sched, pool, runner = setup(num_blocks=8, max_num_batched_tokens=64, max_model_len=32, scheduling_policy="priority")
    shared = prompt_of(0, 16)
    low = make_seq(0, shared + [50, 51, 52], priority=5)
    admit(sched, runner, low)
    step(sched, runner)  # 5 blocks, 3 free
    high = make_seq(1, shared + [60, 61, 62], priority=0)  # 4 blocks cached (low's), 1 more needed
    sched.add([high])
    out = sched.schedule()
    assert out.preempted == [] and [(c.seq, c.start) for c in out.scheduled] == [(low, 20), (high, 16)]


def test_the_outrank_check_counts_blocks_that_choices_share_once():
    sched, pool, runner = setup(num_blocks=20, max_num_batched_tokens=128, max_model_len=80,
                                scheduling_policy="priority", enable_prefix_caching=False)
    admit(sched, runner, make_seq(0, prompt_of(0, 16), priority=0))
    choices = [make_seq(1 + i, prompt_of(1, 24), request_id="low", index=i, priority=5) for i in range(3)]
    sched.add(choices)
    step(sched, runner)
    step(sched, runner)  # the three choices hold 9 distinct blocks (21 references); 6 are free
    sched.add([make_seq(9, prompt_of(9, 70), priority=1)])  # 18 blocks: preempting them all would leave it short
    out = sched.schedule()
    assert out.preempted == [] and all(c.status is SeqStatus.RUNNING for c in choices)
