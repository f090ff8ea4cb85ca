"""LLMEngine and AsyncEngine over a fake model: outputs, stops, failures, aborts, the loop thread."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from glm4serve.engine.async_engine import AsyncEngine
from glm4serve.engine.config import EngineArgs, KVPlan, plan_kv_cache
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import EngineError, SamplingParams
from glm4serve.engine.block_pool import BlockPool
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, continuation, next_token, sched_config, text_of

MODEL_STOPS = FakeTokenizer.stop_token_ids  # (1, 2, 3)
POISON = 60  # FakeTokenizer(fail_on=POISON) raises when asked for its bytes


def make_engine(num_blocks=128, block_size=4, max_model_len=None, budget=64, max_num_seqs=64,
                model=next_token, tokenizer=None, policy="fcfs", **runner_kw):
    pool = BlockPool(num_blocks, block_size)
    cfg = sched_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, scheduling_policy=policy,
                       max_model_len=max_model_len or num_blocks * block_size, block_size=block_size)
    runner = FakeRunner(num_blocks, block_size, model=model, **runner_kw)
    engine = LLMEngine(runner, tokenizer or FakeTokenizer(), cfg, pool, MODEL_STOPS, vocab_size=VOCAB)
    return engine, runner, pool


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def prompt_of(i: int, length: int) -> list[int]:
    return [10 + (i * 11 + j * 5) % 50 for j in range(length)]


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list = field(default_factory=list)
    num_outputs: int = 0


def collect(outputs, into: dict) -> None:
    for o in outputs:
        c = into.setdefault((o.request_id, o.index), Choice())
        assert c.finish_reason is None, f"output after the finish of {o.request_id}#{o.index}"
        c.token_ids += o.token_ids
        c.text += o.text
        c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
        c.logprobs += o.logprobs or []
        c.num_outputs += 1
        assert o.num_output_tokens == len(c.token_ids)


def run(engine, got: dict | None = None, max_steps=5000) -> dict:
    got = {} if got is None else got
    steps = 0
    while engine.has_work:
        assert steps < max_steps, "no progress"
        collect(engine.step(), got)
        steps += 1
    return got


# --- LLMEngine --------------------------------------------------------------------------------


def test_outputs_follow_the_model_and_free_everything():
    engine, runner, pool = make_engine()
    prompts = {f"q{i}": prompt_of(i, 3 + 4 * i) for i in range(5)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, greedy(max_tokens=7))
    got = run(engine)
    for rid, p in prompts.items():
        c = got[(rid, 0)]
        want = continuation(p, 7)
        assert c.token_ids == want and c.text == text_of(want)
        assert c.finish_reason == "length" and c.num_outputs == 7
    assert pool.num_free == pool.num_blocks and engine.stats().num_running == 0


def test_new_requests_join_a_running_batch():
    engine, runner, pool = make_engine()
    engine.add_request("a", prompt_of(0, 5), greedy(max_tokens=20))
    got: dict = {}
    for _ in range(4):
        collect(engine.step(), got)
    engine.add_request("b", prompt_of(1, 6), greedy(max_tokens=3))
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]  # b's prefill rode along a's decode
    collect(outs, got)
    assert engine.stats().num_running == 2
    run(engine, got)
    assert got[("a", 0)].token_ids == continuation(prompt_of(0, 5), 20)
    assert got[("b", 0)].token_ids == continuation(prompt_of(1, 6), 3)


def test_long_prompt_prefills_in_chunks_while_others_get_a_token_every_step():
    engine, runner, pool = make_engine(num_blocks=256, budget=16)
    for i in range(3):
        engine.add_request(f"s{i}", prompt_of(i, 4), greedy(max_tokens=40))
    got: dict = {}
    collect(engine.step(), got)
    long_prompt = prompt_of(7, 300)
    engine.add_request("long", long_prompt, greedy(max_tokens=2))
    steps = 0
    while ("long", 0) not in got:
        outs = engine.step()
        steps += 1
        assert sorted(o.request_id for o in outs if o.request_id != "long") == ["s0", "s1", "s2"]
        assert all(out.num_tokens <= 16 for out in runner.steps)
        collect(outs, got)
    assert steps == -(-300 // 13)  # 13 prompt tokens a step beside the 3 decodes
    run(engine, got)
    assert got[("long", 0)].token_ids == continuation(long_prompt, 2)


def workload(engine, n_req=12):
    for i in range(n_req):
        engine.add_request(f"w{i}", prompt_of(i, 3 + i % 9), greedy(max_tokens=10 + (i * 7) % 15))
    return run(engine)


def test_preemption_in_a_tiny_pool_keeps_outputs_and_frees_the_pool():
    big, _, _ = make_engine(num_blocks=256, max_model_len=64)
    tiny, _, tiny_pool = make_engine(num_blocks=16, max_model_len=64)  # 64 slots for 12 requests
    expected = workload(big)
    assert big.stats().num_preemptions_total == 0
    assert workload(tiny) == expected
    assert tiny.stats().num_preemptions_total > 0
    assert tiny_pool.num_free == tiny_pool.num_blocks


def test_seeded_sampling_with_forks_survives_preemption():
    def go(num_blocks):
        engine, runner, pool = make_engine(num_blocks=num_blocks, max_model_len=48, peak=1.0)
        engine.add_request("n", prompt_of(3, 9), SamplingParams(n=4, seed=7, max_tokens=30, temperature=1.0, ignore_eos=True))
        engine.add_request("m", prompt_of(4, 5), SamplingParams(seed=8, max_tokens=25, temperature=1.0, ignore_eos=True))
        got = run(engine)
        assert pool.num_free == pool.num_blocks
        return got, engine.stats().num_preemptions_total

    (a, pre_a), (b, pre_b) = go(256), go(14)
    assert pre_a == 0 and pre_b > 0
    assert a == b
    assert len({tuple(a[("n", i)].token_ids) for i in range(4)}) == 4  # the choices really diverged


def test_a_request_failing_in_sampling_leaves_others_seeded_samples_as_they_were():
    seeded = SamplingParams(seed=11, max_tokens=12, temperature=1.0, ignore_eos=True)
    # logprobs=2.5 fails the batched sampler after its draws (no int): the rows are sampled again alone
    broken = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, logprobs=2.5)
    outputs = []
    for others in ([], [("bad", broken)]):
        engine, _, pool = make_engine(peak=1.0)
        engine.add_request("s", prompt_of(3, 9), seeded)
        for rid, params in others:
            engine.add_request(rid, prompt_of(4, 5), params)
        outputs.append(run(engine)[("s", 0)].token_ids)
        assert [rid for rid, _ in engine.pop_errors()] == [rid for rid, _ in others]
        assert pool.num_free == pool.num_blocks
    assert outputs[0] == outputs[1]


def test_n_choices_share_the_prompt_and_agree_when_greedy():
    engine, runner, pool = make_engine()
    prompt = prompt_of(2, 10)
    engine.add_request("n", prompt, greedy(n=3, max_tokens=5))
    outs = engine.step()
    assert [(o.index, o.token_ids) for o in outs] == [(i, continuation(prompt, 1)) for i in range(3)]
    assert len(runner.steps[0].chunks) == 1  # one prefill for three choices
    table = engine.scheduler.running[0].block_table
    assert [pool.ref_count(b) for b in table] == [3, 3, 3]
    got: dict = {}
    collect(outs, got)
    run(engine, got)
    assert len(runner.steps[1].block_copies) == 2
    for i in range(3):
        assert got[("n", i)].token_ids == continuation(prompt, 5)
    assert pool.num_free == pool.num_blocks


def test_n_choices_that_end_at_their_first_token():
    engine, runner, pool = make_engine()
    engine.add_request("one", prompt_of(4, 6), greedy(n=3, max_tokens=1))
    got = run(engine)
    assert [got[("one", i)].finish_reason for i in range(3)] == ["length"] * 3
    assert pool.num_free == pool.num_blocks and not engine.has_work


def scripted(at: int, token: int):
    """A model that says `token` once its context is `at` tokens long, else follows next_token."""
    return lambda ctx: token if len(ctx) == at else next_token(ctx)


def test_stop_token_ends_with_stop_and_is_not_text():
    prompt = prompt_of(0, 6)
    engine, runner, pool = make_engine(model=scripted(9, 2))
    engine.add_request("x", prompt, greedy(max_tokens=20))
    c = run(engine)[("x", 0)]
    first = continuation(prompt, 3)
    assert c.token_ids == first + [2]
    assert c.text == text_of(first) and "<2>" not in c.text
    assert (c.finish_reason, c.stop_reason) == ("stop", 2)
    assert pool.num_free == pool.num_blocks


def test_ignore_eos_and_explicit_stop_ids():
    prompt = prompt_of(0, 6)
    engine, _, _ = make_engine(model=scripted(9, 2))
    engine.add_request("ignore", prompt, greedy(max_tokens=6, ignore_eos=True))
    engine.add_request("explicit", prompt, greedy(max_tokens=6, ignore_eos=True, stop_token_ids=[2]))
    plain = continuation(prompt, 3)
    engine.add_request("own", prompt, greedy(max_tokens=6, stop_token_ids=[plain[1]]))  # a plain token stops too
    got = run(engine)
    assert got[("ignore", 0)].finish_reason == "length" and len(got[("ignore", 0)].token_ids) == 6
    assert got[("ignore", 0)].token_ids[3] == 2
    assert (got[("explicit", 0)].finish_reason, got[("explicit", 0)].stop_reason) == ("stop", 2)
    own = got[("own", 0)]
    assert own.token_ids == plain[:2] and own.stop_reason == plain[1] and own.text == text_of(plain[:1])


def test_explicit_stop_ids_add_to_the_models_own():
    engine, _, _ = make_engine(model=scripted(9, 2))
    engine.add_request("both", prompt_of(0, 6), greedy(max_tokens=6, stop_token_ids=[61]))
    got = run(engine)[("both", 0)]
    assert (got.finish_reason, got.stop_reason) == ("stop", 2) and len(got.token_ids) == 4


def test_min_tokens_holds_back_stop_ids():
    engine, _, _ = make_engine(model=lambda ctx: 2)  # a model that only wants to stop
    engine.add_request("m", prompt_of(0, 4), greedy(max_tokens=10, min_tokens=3))
    engine.add_request("n", prompt_of(0, 4), greedy(max_tokens=10))
    got = run(engine)
    m = got[("m", 0)]
    assert len(m.token_ids) == 4 and not set(m.token_ids[:3]) & set(MODEL_STOPS) and m.token_ids[3] == 2
    assert m.finish_reason == "stop"
    assert got[("n", 0)].token_ids == [2]


def test_stop_string_ends_with_stop_and_is_cut_from_the_text():
    prompt = prompt_of(1, 5)
    full = text_of(continuation(prompt, 12))
    stop = full[6:8]
    cut = full.find(stop)
    engine, _, _ = make_engine()
    engine.add_request("s", prompt, greedy(max_tokens=12, stop=[stop]))
    c = run(engine)[("s", 0)]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[:cut] and len(c.token_ids) == cut + len(stop)


def test_stop_strings_wait_for_min_tokens():
    prompt = prompt_of(1, 5)
    full = text_of(continuation(prompt, 30))  # one character a token
    stop = next(c for c in full[:5] if c in full[5:])  # stops early, and again after min_tokens
    engine, _, _ = make_engine()
    engine.add_request("s", prompt, greedy(max_tokens=30, min_tokens=5, stop=[stop]))
    c = run(engine)[("s", 0)]
    cut = full.find(stop, 5)
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[:cut] and len(c.token_ids) == cut + 1


def test_text_held_back_for_a_stop_string_is_flushed_at_length():
    prompt = prompt_of(2, 5)
    full = text_of(continuation(prompt, 6))
    engine, _, _ = make_engine()
    engine.add_request("h", prompt, greedy(max_tokens=6, stop=[full[-1] + "!"]))
    c = run(engine)[("h", 0)]
    assert c.finish_reason == "length" and c.text == full


def test_context_limit_ends_with_length():
    engine, _, pool = make_engine(num_blocks=8, block_size=4, max_model_len=16)
    engine.add_request("c", prompt_of(0, 11), greedy(max_tokens=100))
    c = run(engine)[("c", 0)]
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    assert pool.num_free == pool.num_blocks


def test_logprobs_pass_through():
    engine, _, _ = make_engine()
    engine.add_request("l", prompt_of(0, 4), greedy(max_tokens=3, logprobs=2))
    engine.add_request("no", prompt_of(0, 4), greedy(max_tokens=3))
    got = run(engine)
    lps = got[("l", 0)].logprobs
    assert [lp.token_id for lp in lps] == got[("l", 0)].token_ids
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id and lp.logprob > -1e-6 for lp in lps)
    assert got[("no", 0)].logprobs == []


def test_abort_half_of_sixteen_running_requests_frees_their_blocks():
    engine, _, pool = make_engine(num_blocks=256)
    for i in range(16):
        engine.add_request(f"r{i}", prompt_of(i, 9), greedy(max_tokens=30))
    got: dict = {}
    for _ in range(3):
        collect(engine.step(), got)
    assert engine.stats().num_running == 16 and pool.num_used == 16 * 3
    for i in range(0, 16, 2):
        outs = engine.abort(f"r{i}")
        assert [(o.request_id, o.finish_reason, o.token_ids) for o in outs] == [(f"r{i}", "abort", [])]
        collect(outs, got)
    assert engine.abort("r0") == [] and engine.abort("never") == []
    assert engine.stats().num_running == 8 and pool.num_used == 8 * 3
    run(engine, got)
    assert all(got[(f"r{i}", 0)].finish_reason == ("abort" if i % 2 == 0 else "length") for i in range(16))
    assert pool.num_free == pool.num_blocks


def test_a_failing_request_leaves_the_others_served():
    poisoned = prompt_of(5, 6)
    engine, _, pool = make_engine(
        model=lambda ctx: POISON if ctx[: len(poisoned)] == poisoned and len(ctx) == 9 else next_token(ctx),
        tokenizer=FakeTokenizer(fail_on=POISON),
    )
    engine.add_request("bad", poisoned, greedy(n=2, max_tokens=10))
    for i in range(3):
        engine.add_request(f"ok{i}", prompt_of(i, 6), greedy(max_tokens=10))
    got = run(engine)
    errors = engine.pop_errors()
    assert [rid for rid, _ in errors] == ["bad"] and isinstance(errors[0][1], EngineError)
    assert "injected detokenizer failure" in str(errors[0][1])
    assert len(got[("bad", 0)].token_ids) == 3 and got[("bad", 0)].finish_reason is None
    for i in range(3):
        assert got[(f"ok{i}", 0)].token_ids == continuation(prompt_of(i, 6), 10)
    assert pool.num_free == pool.num_blocks and engine.pop_errors() == []


def test_a_sampling_failure_fails_only_its_request():
    engine, _, pool = make_engine()
    engine.add_request("bad", prompt_of(0, 5), greedy(max_tokens=4, logit_bias={"not a token": 1.0}))
    engine.add_request("ok", prompt_of(1, 5), greedy(max_tokens=4))
    got = run(engine)
    assert [rid for rid, _ in engine.pop_errors()] == ["bad"]
    assert ("bad", 0) not in got
    assert got[("ok", 0)].token_ids == continuation(prompt_of(1, 5), 4)
    assert pool.num_free == pool.num_blocks


def test_a_failing_forward_fails_its_batch_and_the_engine_goes_on():
    engine, runner, pool = make_engine(budget=16)
    engine.add_request("a", prompt_of(0, 5), greedy(max_tokens=5))
    engine.add_request("b", prompt_of(1, 5), greedy(max_tokens=5))
    engine.step()
    engine.add_request("c", prompt_of(2, 40), greedy(n=2, max_tokens=5))  # waits: budget is 16
    runner.fail_next = True
    assert engine.step() == []
    failed = {rid for rid, _ in engine.pop_errors()}
    assert failed == {"a", "b", "c"}  # c's first chunk was in the failed batch
    assert pool.num_free == pool.num_blocks and not engine.has_work
    engine.add_request("d", prompt_of(3, 5), greedy(max_tokens=5))
    got = run(engine)
    assert got[("d", 0)].token_ids == continuation(prompt_of(3, 5), 5)


def test_bad_requests_are_refused_at_add():
    engine, _, _ = make_engine(num_blocks=8, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", prompt_of(0, 33), greedy())
    with pytest.raises(ValueError, match="n must"):
        engine.add_request("n0", prompt_of(0, 3), greedy(n=0))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("m0", prompt_of(0, 3), greedy(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("v", [5, VOCAB], greedy())
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        engine.add_request("p", prompt_of(0, 3), greedy(priority=1))
    engine.add_request("dup", prompt_of(0, 3), greedy())
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", prompt_of(0, 3), greedy())
    assert engine.stats().num_waiting == 1


def test_a_request_of_higher_priority_is_served_first_and_the_one_it_preempts_loses_nothing():
    engine, runner, pool = make_engine(max_num_seqs=1, policy="priority")
    engine.add_request("batch", prompt_of(0, 9), greedy(max_tokens=30, priority=5))
    got: dict = {}
    for _ in range(5):
        collect(engine.step(), got)
    engine.add_request("chat", prompt_of(1, 6), greedy(max_tokens=4, priority=0))
    finished = []
    while engine.has_work:
        outs = engine.step()
        collect(outs, got)
        finished += [o.request_id for o in outs if o.finish_reason]
    assert finished == ["chat", "batch"]  # one seat: chat took batch's at once
    assert engine.stats().num_preemptions_total == 1
    assert got[("chat", 0)].token_ids == continuation(prompt_of(1, 6), 4)
    assert got[("batch", 0)].token_ids == continuation(prompt_of(0, 9), 30)
    assert pool.num_free == pool.num_blocks


def test_the_kv_plan_caps_the_context_by_the_cache():
    args = EngineArgs(block_size=16, num_kv_blocks=100)
    assert plan_kv_cache(args, model_max_len=131072, bytes_per_token=1024, device="cpu") == KVPlan(100, 1600)
    assert plan_kv_cache(args, model_max_len=1000, bytes_per_token=1024, device="cpu") == KVPlan(100, 1000)
    asked = EngineArgs(max_model_len=512, kv_cache_memory="1MiB")
    assert plan_kv_cache(asked, 131072, 1024, "cpu") == KVPlan((1 << 20) // (1024 * 16), 512)
    with pytest.raises(ValueError, match="needs more KV cache"):
        plan_kv_cache(EngineArgs(max_model_len=1601, num_kv_blocks=100), 131072, 1024, "cpu")
    with pytest.raises(ValueError, match="holds no block"):
        plan_kv_cache(EngineArgs(kv_cache_memory=1000), 131072, 1024, "cpu")
    # past the model's own context (glm-4-9b's 8,192), whatever the cache holds: as vLLM, refused
    with pytest.raises(ValueError, match="longer than the model's context of 8192"):
        plan_kv_cache(EngineArgs(max_model_len=8193, num_kv_blocks=1000), 8192, 1024, "cpu")
    assert plan_kv_cache(EngineArgs(max_model_len=8192, num_kv_blocks=1000), 8192, 1024, "cpu").max_model_len == 8192


def test_blocks_and_memory_both_given_take_the_blocks_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        plan = plan_kv_cache(EngineArgs(kv_cache_memory="1GiB", num_kv_blocks=10), 131072, 1024, "cpu")
    assert plan.num_blocks == 10
    assert "num_kv_blocks (10) sizes the KV cache; kv_cache_memory is not used" in caplog.text


# --- AsyncEngine ------------------------------------------------------------------------------


@pytest.fixture
def async_engine():
    engines = []

    def make(**kw):
        engine, runner, pool = make_engine(**kw)
        ae = AsyncEngine.start(lambda: engine)
        engines.append(ae)
        return ae, runner, pool

    yield make
    for ae in engines:
        ae.shutdown(timeout=5)


async def consume(ae, rid, prompt, params) -> dict:
    got: dict = {}
    async for o in ae.generate(prompt, params, request_id=rid):
        collect([o], got)
    return got


async def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_concurrent_generates(async_engine):
    ae, runner, pool = async_engine()
    prompts = [prompt_of(i, 4 + i) for i in range(8)]
    results = await asyncio.gather(*[consume(ae, f"g{i}", p, greedy(max_tokens=6, n=1 + i % 2))
                                     for i, p in enumerate(prompts)])
    for i, (p, got) in enumerate(zip(prompts, results)):
        assert len(got) == 1 + i % 2
        for c in got.values():
            assert c.token_ids == continuation(p, 6) and c.finish_reason == "length"
    await wait_until(lambda: ae.stats().kv_blocks_used == 0)
    assert len({len(s.chunks) for s in runner.steps}) > 1  # requests really shared steps
    s = ae.stats()
    assert s.alive and s.num_running == 0 and s.kv_blocks_total == pool.num_blocks


async def test_leaving_the_stream_aborts_the_request(async_engine):
    ae, runner, pool = async_engine(num_blocks=512, delay=0.002)
    stream = ae.generate(prompt_of(0, 8), greedy(max_tokens=1000), request_id="gone")
    got = [await stream.__anext__() for _ in range(3)]
    assert pool.num_used > 0 and all(o.finish_reason is None for o in got)
    (seq,) = ae.engine.scheduler.seqs_of("gone")
    await stream.aclose()
    await wait_until(lambda: pool.num_used == 0)
    assert seq.finish_reason == "abort" and seq.num_output_tokens < 1000
    assert not ae.engine.has_request("gone") and ae.is_alive


async def test_cancelled_consumer_aborts_the_request(async_engine):
    ae, runner, pool = async_engine(num_blocks=512, delay=0.002)
    seen = asyncio.Event()

    async def reader():
        async for _ in ae.generate(prompt_of(1, 8), greedy(max_tokens=1000, n=2), request_id="cx"):
            seen.set()

    task = asyncio.create_task(reader())
    await seen.wait()
    seqs = ae.engine.scheduler.seqs_of("cx")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: pool.num_used == 0)
    assert [s.finish_reason for s in seqs] == ["abort", "abort"]
    assert not ae.engine.has_request("cx")


async def test_abort_ends_the_stream_with_abort(async_engine):
    ae, runner, pool = async_engine(num_blocks=512, delay=0.002)
    outs = []
    async for o in ae.generate(prompt_of(2, 6), greedy(max_tokens=1000), request_id="ab"):
        outs.append(o)
        if len(outs) == 2:
            ae.abort("ab")
    assert outs[-1].finish_reason == "abort" and all(o.finish_reason is None for o in outs[:-1])
    assert len(outs) < 1000
    await wait_until(lambda: pool.num_used == 0)


async def test_abort_of_one_choice_ends_it_and_its_sibling_goes_on_to_its_end(async_engine):
    ae, runner, pool = async_engine(num_blocks=512, delay=0.002)
    prompt, outs = prompt_of(3, 6), []
    async for o in ae.generate(prompt, greedy(max_tokens=40, n=2), request_id="one"):
        outs.append(o)
        if len(outs) == 4:
            ae.abort("one", index=1)
    ends = [(o.index, o.finish_reason) for o in outs if o.finish_reason is not None]
    assert ends == [(1, "abort"), (0, "length")]  # the stream ends once its last choice does
    assert [len(o.token_ids) for o in outs if o.index == 1 and o.finish_reason == "abort"] == [0]
    choice1 = [t for o in outs if o.index == 1 for t in o.token_ids]
    assert choice1 == continuation(prompt, 40)[:len(choice1)] and len(choice1) < 10
    assert [t for o in outs if o.index == 0 for t in o.token_ids] == continuation(prompt, 40)
    await wait_until(lambda: pool.num_used == 0)
    assert not ae.engine.has_request("one")


async def test_failed_and_refused_requests_raise(async_engine):
    poisoned = prompt_of(5, 6)
    ae, runner, pool = async_engine(
        model=lambda ctx: POISON if ctx[: len(poisoned)] == poisoned and len(ctx) == 8 else next_token(ctx),
        tokenizer=FakeTokenizer(fail_on=POISON),
    )

    async def bad():
        with pytest.raises(EngineError, match="injected"):
            await consume(ae, "bad", poisoned, greedy(max_tokens=10))

    _, ok = await asyncio.gather(bad(), consume(ae, "ok", prompt_of(1, 6), greedy(max_tokens=10)))
    assert ok[("ok", 0)].token_ids == continuation(prompt_of(1, 6), 10)
    with pytest.raises(ValueError, match="max_model_len"):
        await consume(ae, "long", prompt_of(0, 10_000), greedy())
    await wait_until(lambda: pool.num_used == 0)
    assert ae.is_alive


async def test_loop_death_is_visible_and_fails_the_streams(async_engine):
    ae, runner, pool = async_engine(delay=0.002)
    stream = ae.generate(prompt_of(0, 5), greedy(max_tokens=1000), request_id="x")
    await stream.__anext__()

    def broken_step():
        raise RuntimeError("scheduler bug")

    ae.engine.step = broken_step
    with pytest.raises(EngineError, match="died"):
        async for _ in stream:
            pass
    await wait_until(lambda: not ae.is_alive)
    assert ae.stats().alive is False
    with pytest.raises(EngineError):
        await consume(ae, "y", prompt_of(0, 5), greedy())


async def test_idle_loop_sleeps_and_shutdown_stops_it(async_engine):
    ae, runner, pool = async_engine()
    await consume(ae, "warm", prompt_of(0, 4), greedy(max_tokens=2))
    await wait_until(lambda: ae.stats().kv_blocks_used == 0)  # published at the end of its last turn
    calls = []
    real_stats = ae.engine.stats
    ae.engine.stats = lambda: calls.append(1) or real_stats()  # called once per loop turn
    await asyncio.sleep(0.1)
    assert len(calls) == 0  # asleep on the condition, not spinning
    ae.abort("nothing")  # a command wakes it for exactly one turn
    await wait_until(lambda: len(calls) == 1)
    await asyncio.sleep(0.05)
    assert len(calls) == 1
    ae.shutdown(timeout=5)
    assert not ae.is_alive
    with pytest.raises(EngineError):
        await consume(ae, "late", prompt_of(0, 4), greedy())


async def test_engine_built_on_its_loop_thread_serves_and_build_errors_reach_the_caller():
    import threading

    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return make_engine()[0]

    ae = AsyncEngine.start(build)
    try:
        assert built_on == [ae._thread] and ae._thread is not threading.current_thread() and ae.is_alive
        got = (await consume(ae, "r", prompt_of(0, 5), greedy(max_tokens=6)))["r", 0]
        assert got.token_ids == continuation(prompt_of(0, 5), 6) and got.finish_reason == "length"
    finally:
        ae.shutdown()

    def broken():
        raise FileNotFoundError("no checkpoint here")

    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        AsyncEngine.start(broken)


async def test_the_loop_trims_the_heap_once_each_time_it_goes_idle(async_engine, monkeypatch):
    from glm4serve.engine import async_engine as module

    trims, step_ends = [], []
    monkeypatch.setattr(module, "release_free_memory", lambda: trims.append(time.monotonic()) or True)
    monkeypatch.setattr(module, "TRIM_AFTER_IDLE_S", 0.2)
    ae, runner, pool = async_engine()
    step = ae.engine.step
    ae.engine.step = lambda: (step(), step_ends.append(time.monotonic()))[0]
    await asyncio.sleep(0.3)
    assert trims == []  # idle from the start: nothing to give back
    for i in range(2):
        await asyncio.gather(*[consume(ae, f"t{i}{j}", prompt_of(j, 5), greedy(max_tokens=4)) for j in range(3)])
        await wait_until(lambda: len(trims) == i + 1)
        assert trims[-1] - step_ends[-1] >= 0.2 * 0.9  # only after the loop sat idle that long
        await asyncio.sleep(0.3)
        assert len(trims) == i + 1  # and not again while it stays idle


def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    """What the loop's trim is for: glibc keeps the free holes between live heap chunks resident."""
    script = """
from glm4serve.engine.async_engine import release_free_memory
rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
start = rss()
chunks = [bytes(64 * 1024) for _ in range(4000)]  # 250 MiB in chunks under the mmap threshold: on the heap
kept = chunks[::16]
del chunks  # 15 of 16 freed, each hole between two live chunks
held = rss()
print(start, held, rss() if release_free_memory() else -1)
"""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: RSS cannot be read")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    start, held, after = map(int, out.split())
    if after == -1:
        pytest.skip("no glibc malloc_trim on this platform")
    assert held - start > 150  # the holes stay resident without the trim
    assert held - after > 120, (start, held, after)


def test_prompt_logprobs_are_the_models_per_position_and_cap_a_steps_logit_rows(monkeypatch):
    """Two 900-token prompts asking for prompt logprobs, one that does not: the logit rows after every
    prompt token stay within PROMPT_LOGIT_ROWS a step (the other prompt gets the rest of the budget),
    and each prompt token's logprob, rank and top tokens are the model's at that position."""
    from glm4serve.engine import sampler, scheduler

    PROMPT_LOGIT_ROWS = 512  # a cap below the step's budget, to see it hold
    monkeypatch.setattr(scheduler, "PROMPT_LOGIT_ROWS", PROMPT_LOGIT_ROWS)
    monkeypatch.setattr(sampler, "SCORE_ROWS", 100)  # rows taken in slices: their seams must not show
    engine, runner, pool = make_engine(num_blocks=1024, budget=2048)
    prompts = {}
    for i in range(2):
        p = prompt_of(i, 3) + continuation(prompt_of(i, 3), 897)
        # tokens the model does not predict
        p[100 + i], p[700] = 10 + (p[100 + i] + 1 - 10) % 50, 10 + (p[700] + 7 - 10) % 50
        prompts[f"lp{i}"] = p
        engine.add_request(f"lp{i}", p, greedy(max_tokens=2, prompt_logprobs=2))
    engine.add_request("plain", prompt_of(5, 900), greedy(max_tokens=2))
    firsts, got = {}, {}
    while engine.has_work:
        outputs = engine.step()
        for o in outputs:
            firsts.setdefault(o.request_id, o)
        collect(outputs, got)
    assert engine.pop_errors() == [] and pool.num_free == pool.num_blocks
    rows = [sum(len(c.token_ids) for c in batch.chunks if c.all_logits) for batch in runner.steps]
    assert max(rows) == PROMPT_LOGIT_ROWS and sum(rows) >= 2 * 899
    # first come first served: the plain prompt, queued last, is admitted whole beside the capped rows
    assert any(r == PROMPT_LOGIT_ROWS and 900 in [len(c.token_ids) for c in batch.chunks if not c.all_logits]
               for r, batch in zip(rows, runner.steps))
    assert firsts["plain"].prompt_logprobs is None
    for rid, p in prompts.items():
        lps = firsts[rid].prompt_logprobs
        assert len(lps) == len(p) and lps[0] is None
        for pos in range(1, len(p)):
            predicted = next_token(p[:pos])
            lp = lps[pos]
            assert lp.token_id == p[pos] and [t for t, _ in lp.top] == [predicted, lp.top[1][0]]
            assert (lp.rank == 1) == (p[pos] == predicted) and (lp.logprob > -1) == (p[pos] == predicted)
        i = int(rid[-1])  # the model's own continuation up to the changed token: its likeliest each time
        assert all(lp.rank == 1 for lp in lps[3 : 100 + i]) and lps[100 + i].rank > 1


def test_prompt_logprobs_survive_a_preemption_mid_prompt():
    """Preempted part-way through its prompt, a request recomputes it from the start: each prompt
    position is recorded once, and the siblings of n=2 get the same list."""
    engine, runner, pool = make_engine(num_blocks=20, budget=6)
    engine.add_request("long", prompt_of(1, 10), greedy(max_tokens=60, ignore_eos=True))
    p = prompt_of(2, 3) + continuation(prompt_of(2, 3), 57)  # the two outgrow the 80-token pool mid-prompt
    engine.add_request("lp", p, greedy(max_tokens=3, n=2, prompt_logprobs=1, ignore_eos=True))
    firsts = {}
    while engine.has_work:
        for o in engine.step():
            if o.num_output_tokens == 1:
                firsts[(o.request_id, o.index)] = o
    assert engine.pop_errors() == [] and pool.num_free == pool.num_blocks
    starts = [c.start for batch in runner.steps for c in batch.chunks if c.all_logits]
    assert 0 in starts[1:], "the prompt was not recomputed: no preemption mid-prompt"
    lps = firsts[("lp", 0)].prompt_logprobs
    assert firsts[("lp", 1)].prompt_logprobs is lps and len(lps) == len(p) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == p[1:] and all(lp.rank == 1 for lp in lps[3:])


def test_a_scored_prompt_is_no_prefix_cache_query():
    """It never looks the cache up, so it must not count as a miss (an evaluation run's hit rate)."""
    engine, _, _ = make_engine()
    engine.add_request("scored", prompt_of(3, 40), greedy(max_tokens=1, prompt_logprobs=0))
    while engine.has_work:
        engine.step()
    assert engine.stats().prefix_cache_queries == 0
    engine.add_request("plain", prompt_of(3, 40), greedy(max_tokens=1))
    while engine.has_work:
        engine.step()
    stats = engine.stats()
    assert stats.prefix_cache_queries == 40 and stats.prefix_cache_hits == 36  # its blocks, written by the first


async def test_a_lora_load_whose_caller_stops_waiting_never_runs_and_the_loop_goes_on(async_engine):
    """Loads run on the loop thread between steps; one cancelled while queued is skipped, one cancelled
    while running completes, and neither kills the loop."""
    import threading

    ae, runner, pool = async_engine()
    running, release, loaded = threading.Event(), threading.Event(), []

    def load_lora(name, path, replace=False):
        running.set()
        if name == "slow":
            release.wait(5)
        loaded.append(name)

    ae.engine.load_lora = load_lora
    slow = asyncio.create_task(ae.load_lora("slow", "/a"))
    await wait_until(running.is_set)  # the loop thread is inside it
    queued = asyncio.create_task(ae.load_lora("queued", "/b"))
    await asyncio.sleep(0.05)
    queued.cancel()
    slow.cancel()
    await asyncio.wait({queued, slow})  # their cancellation has reached the loop's futures
    release.set()
    for task in (slow, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    got = await consume(ae, "after", prompt_of(0, 4), greedy(max_tokens=2))
    assert [c.token_ids for c in got.values()] == [continuation(prompt_of(0, 4), 2)]
    assert loaded == ["slow"] and ae.is_alive
