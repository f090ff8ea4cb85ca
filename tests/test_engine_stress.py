"""LLMEngine and its Scheduler under random mixes of requests over the fake runner, checked every step.

Scenario tests pin one situation each; bugs hide where features meet (a fork preempted mid-prefill, a draft past
a copied-on-write block, n > max_num_seqs choices behind a prefix cache hit on a pool one sequence fills). Each
seed draws a case: tiny pools, small budgets, n up to 3 x max_num_seqs, prefix caching, ngram drafts, FCFS or
priority, late arrivals, aborts, prompt logprobs, stop tokens, a failing forward. Every step, each block's
reference count is the number of block tables holding it, the free blocks are the unheld ones, each unfinished
sequence sits in one place within max_num_seqs seats, and the batch keeps to its budget, schedules and samples
no sequence twice, writes no block another sequence or the prefix cache holds and reads back its own context.
At the end the pool is all free and every choice finished once, with the tokens the request gets alone on a big
pool (a prefix of them when aborted or failed). A failure names its seed: `-k "[123]"` reruns that case.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from glm4serve.engine import scheduler as scheduler_module
from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.sequence import SeqStatus
from glm4serve.engine.types import ABORT, SamplingParams
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, next_token, sched_config

SEEDS = range(600)
PERIOD = 5  # of the repeating prompts and of the copying model: what ngram drafts guess right


def copying(context: list[int]) -> int:
    return context[-PERIOD] if len(context) >= PERIOD else next_token(context)


def copying_mostly(context: list[int]) -> int:  # drafts kept, then rejected part-way
    return next_token(context) if len(context) % 7 == 0 else copying(context)


MODELS = [next_token, copying, copying_mostly]


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    add_step: int
    abort_step: int | None


@dataclass
class Case:
    block_size: int
    max_model_len: int
    num_blocks: int  # from just enough for one max_model_len sequence: preemption is common
    max_num_seqs: int
    budget: int
    prefix_caching: bool
    spec: dict | None
    policy: str
    model: Callable[[list[int]], int]
    peak: float  # 2.0: soft logits, so that seeded sampling at temperature 1 varies
    prompt_logit_rows: int  # scheduler.PROMPT_LOGIT_ROWS: few cut prompt-logprob prefills into more steps
    fail_steps: set[int]
    requests: list[Request]


def draw_case(seed: int) -> Case:
    r = random.Random(seed)
    block_size, max_model_len = r.choice([1, 2, 3, 4, 4, 8]), r.randint(6, 40)
    num_blocks = -(-max_model_len // block_size) + r.choice([0, 0, 0, 1, 2, 4, 8, 30])
    max_num_seqs, policy = r.randint(1, 4), r.choice(["fcfs", "priority"])
    spec = None
    if r.random() < 0.5:
        lo = r.randint(1, 3)
        spec = {"method": "ngram", "num_speculative_tokens": r.randint(1, 5), "prompt_lookup_min": lo,
                "prompt_lookup_max": r.randint(lo, 4),
                "disable_by_batch_size": r.randint(1, 3) if r.random() < 0.25 else None}
    bases = [[10 + r.randrange(50) for _ in range(max_model_len)] for _ in range(2)]  # shared prefixes: cache hits
    requests = []
    for i in range(r.randint(1, 6)):
        plen = r.randint(1, max_model_len)
        cut = r.randint(0, plen)
        prompt = r.choice(bases)[:cut] + [10 + r.randrange(50) for _ in range(plen - cut)]
        if r.random() < 0.15:  # repeats itself: ngram drafts find matches
            prompt = (prompt[:PERIOD] * 20)[:plen]
        max_tokens = r.randint(1, max(1, max_model_len - plen + 3))  # past max_model_len at times
        greedy = r.random() < 0.5  # else seeded sampling: the same tokens whatever the batch
        params = SamplingParams(
            n=r.randint(1, 3 * max_num_seqs) if r.random() < 0.7 else 1, max_tokens=max_tokens,
            temperature=0.0 if greedy else 1.0, seed=None if greedy else r.randrange(1000),
            stop_token_ids=r.sample(range(10, 60), r.randint(1, 6)) if r.random() < 0.3 else None,
            min_tokens=min(r.randint(0, 3), max_tokens) if r.random() < 0.1 else 0,
            prompt_logprobs=r.choice([0, 2]) if r.random() < 0.25 else None,
            logprobs=r.choice([0, 1]) if r.random() < 0.2 else None,
            priority=r.randint(-2, 2) if policy == "priority" else 0)
        requests.append(Request(f"q{i}", prompt, params, add_step=0 if r.random() < 0.5 else r.randint(0, 30),
                                abort_step=r.randint(0, 40) if r.random() < 0.2 else None))
    return Case(block_size, max_model_len, num_blocks, max_num_seqs,
                budget=r.choice([1, 2, 3, 4, 5, 7, 8, 13, 16, 32, 100]), prefix_caching=r.random() < 0.6,
                spec=spec, policy=policy, model=r.choice(MODELS), peak=r.choice([40.0, 40.0, 2.0]),
                prompt_logit_rows=r.choice([1, 2, 3, 5, 2048, 2048]),
                fail_steps=set(r.sample(range(40), r.randint(1, 2))) if r.random() < 0.15 else set(),
                requests=requests)


class CheckingRunner(FakeRunner):
    """Reads back every chunk's whole context, drafts and mid-prefill chunks too (FakeRunner.run checks only
    sampling ones): a paging or copy-on-write bug shows here even where it changes no sampled token."""

    current = None  # the SchedulerOutput being executed

    def execute(self, batch):
        logits = super().execute(batch)
        for s in self.current.scheduled if self.current else ():
            end = s.start + s.num_tokens
            want = s.seq.token_ids_between(0, end - len(s.draft)) + s.draft
            assert self.context(s.seq.block_table, end) == want, f"the cache of {s.seq} is not its context"
        return logits


def build(case: Case, num_blocks: int, budget: int, max_num_seqs: int, prefix_caching: bool, spec: dict | None):
    pool = BlockPool(num_blocks, case.block_size)
    cfg = sched_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, scheduling_policy=case.policy,
                       max_model_len=case.max_model_len, block_size=case.block_size,
                       enable_prefix_caching=prefix_caching, speculative_config=spec)
    runner = CheckingRunner(num_blocks, case.block_size, model=case.model, peak=case.peak)
    return LLMEngine(runner, FakeTokenizer(), cfg, pool, FakeTokenizer.stop_token_ids, vocab_size=VOCAB), runner


def check_state(sched, where: str) -> None:
    pool, unfinished = sched.pool, list(sched.unfinished())
    queued = [s.seq_id for s in [*sched.running, *sched.waiting]]
    assert len(queued) == len(set(queued)), f"{where}: a sequence both running and waiting, or twice"
    assert len(sched.running) + sched.num_waiting == len(unfinished), f"{where}: queues and requests disagree"
    # private: the seats count the unforked siblings of running parents, which no public property shows
    assert sched._seats_taken() <= sched.cfg.max_num_seqs, f"{where}: more seats taken than max_num_seqs"
    held = Counter()
    for s in unfinished:
        running = s in sched.running
        assert s.status is (SeqStatus.RUNNING if running else SeqStatus.WAITING), f"{where}: {s}"
        want_blocks = pool.blocks_needed(s.num_computed_tokens) if running else 0  # none past its computed tokens
        assert len(s.block_table) == want_blocks, f"{where}: {s} should hold {want_blocks} blocks"
        assert len(set(s.block_table)) == len(s.block_table), f"{where}: {s} holds a block twice"
        held.update(s.block_table)
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == held[b], f"{where}: block {b} counts {pool.ref_count(b)} refs, held {held[b]}"
        assert not pool.is_evictable(b) or held[b] == 0, f"{where}: held block {b} is evictable"
    assert pool.num_free == pool.num_blocks - len(held), f"{where}: {pool.num_free} free, {len(held)} held"


def check_batch(sched, out, where: str) -> None:
    pool, cfg = sched.pool, sched.cfg
    assert out.num_tokens <= cfg.max_num_batched_tokens, f"{where}: {out.num_tokens} tokens over the budget"
    scheduled = [s.seq.seq_id for s in out.scheduled]
    sampling = [q.seq_id for s in out.scheduled for q in s.sample_for]
    assert len(scheduled) == len(set(scheduled)) <= cfg.max_num_seqs, f"{where}: a sequence scheduled twice"
    assert len(sampling) == len(set(sampling)) <= cfg.max_num_seqs, f"{where}: a sequence samples twice"
    for s in out.scheduled:
        seq, real_end = s.seq, s.start + s.num_tokens - len(s.draft)
        assert seq.status is SeqStatus.RUNNING and s.start == seq.num_computed_tokens, f"{where}: {seq}"
        assert s.num_tokens >= 1 and s.start + s.num_tokens <= cfg.max_model_len, f"{where}: {seq} chunk"
        assert (real_end == seq.num_tokens) == bool(s.sample_for) and real_end <= seq.num_tokens, f"{where}: {seq}"
        unforked = all(q.status is SeqStatus.WAITING and not q.block_table for q in s.sample_for[1:])
        assert unforked, f"{where}: siblings sample from {seq}'s row, but were forked already"
        if s.draft:  # only on a lone decoding sequence, never past its max_tokens
            assert s.sample_for == [seq] and seq.num_output_tokens + len(s.draft) < seq.params.max_tokens, where
        written = {seq.block_table[p // pool.block_size] for p in range(s.start, s.start + s.num_tokens)}
        for b in written:  # private _hash_of: whether a used block is in the prefix cache shows nowhere public
            shared = pool.ref_count(b) != 1 or b in pool._hash_of
            assert not shared, f"{where}: {seq} writes into block {b}, shared or in the prefix cache"
    for p in out.preempted:  # and not readmitted in the step that preempted it: its work would be lost for nothing
        assert not p.block_table and p.num_computed_tokens == 0, f"{where}: preempted {p} keeps its cache"
        assert p.seq_id not in scheduled, f"{where}: preempted {p} readmitted at once"


def collect(outputs, got: dict, where: str) -> None:
    for o in outputs:
        choice = got.setdefault((o.request_id, o.index), {"tokens": [], "logprobs": [], "finishes": []})
        name = f"{o.request_id}#{o.index}"
        assert not choice["finishes"], f"{where}: output after the finish of {name}"
        choice["tokens"] += o.token_ids
        choice["logprobs"] += [(lp.token_id, round(lp.logprob, 3)) for lp in o.logprobs or []]
        assert o.num_output_tokens == len(choice["tokens"]), f"{where}: {name} miscounts its tokens"
        if o.prompt_logprobs is not None:
            assert "prompt" not in choice, f"{where}: prompt logprobs twice for {name}"
            choice["prompt"] = [lp and (lp.token_id, round(lp.logprob, 3)) for lp in o.prompt_logprobs]
        if o.finish_reason is not None:
            choice["finishes"].append((o.finish_reason, o.stop_reason))


def alone(case: Case, req: Request) -> dict:
    """The request's choices run by themselves on a big pool: no preemption, drafts or prefix cache."""
    blocks = 4 * -(-case.max_model_len // case.block_size) * req.params.n
    engine, _ = build(case, blocks, budget=10_000, max_num_seqs=64, prefix_caching=False, spec=None)
    engine.add_request(req.request_id, req.prompt, req.params)
    got = {}
    while engine.has_work:
        collect(engine.step(), got, "alone")
    return got


@pytest.mark.parametrize("seed", SEEDS)
def test_random_mix_keeps_invariants_and_outputs(seed, monkeypatch):
    case = draw_case(seed)
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGIT_ROWS", case.prompt_logit_rows)
    engine, runner = build(case, case.num_blocks, case.budget, case.max_num_seqs, case.prefix_caching, case.spec)
    sched, step, plain_schedule = engine.scheduler, 0, engine.scheduler.schedule

    def checked_schedule():
        check_state(sched, f"step {step}")
        out = runner.current = plain_schedule()
        check_batch(sched, out, f"step {step}")
        assert out.scheduled or not sched.has_work, f"step {step}: nothing scheduled while work waits"
        return out

    sched.schedule = checked_schedule
    pending = sorted(case.requests, key=lambda q: q.add_step)
    added, got, failed = [], {}, Counter()
    while pending or engine.has_work:
        assert step < 2000, "no progress"
        while pending and pending[0].add_step <= step:
            req = pending.pop(0)
            engine.add_request(req.request_id, req.prompt, req.params)
            added.append(req)
        for req in [q for q in added if q.abort_step == step]:
            collect(engine.abort(req.request_id), got, f"abort at step {step}")
            check_state(sched, f"abort at step {step}")
        runner.fail_next = step in case.fail_steps
        collect(engine.step(), got, f"step {step}")
        errors = engine.pop_errors()  # the engine turns a runner's failed assertion into failed requests
        assert not errors or step in case.fail_steps, f"step {step}: {errors[0][1]}"
        failed.update(request_id for request_id, _ in errors)
        check_state(sched, f"after step {step}")
        step += 1
    assert sched.pool.num_free == sched.pool.num_blocks and sched.num_requests == 0, "blocks or requests left"
    assert all(k == 1 for k in failed.values()), f"a request failed twice: {failed}"

    for req in added:
        want = alone(case, req)
        for i in range(req.params.n):
            name, ref = f"{req.request_id}#{i}", want[(req.request_id, i)]
            choice = got.get((req.request_id, i), {"tokens": [], "logprobs": [], "finishes": []})
            reasons = [reason for reason, _ in choice["finishes"]]
            assert len(reasons) == 1 or (req.request_id in failed and not reasons), f"{name} finished {reasons}"
            if reasons in ([], [ABORT]):  # failed (no finish) or aborted: cut short of what it gets alone
                assert req.request_id in failed or req.abort_step is not None, f"{name} aborted unasked"
                for key in ("tokens", "logprobs"):
                    assert choice[key] == ref[key][:len(choice[key])], f"{name}: {key} {choice[key]} but alone {ref}"
                assert choice.get("prompt", ref.get("prompt")) == ref.get("prompt"), f"{name}: prompt logprobs"
            else:
                assert choice == ref, f"{name}: {choice} but alone {ref}"
