"""Speculative decoding by prompt lookup: the same tokens as plain decoding, in fewer forwards.

Over the fake runner (engine_fakes.py), whose model reads each context back through the block
tables: a draft's K/V landing in the wrong slot, a rejected token left in the prefix cache or a
processor seeing the wrong history changes the tokens. Then over a small random GLM-4.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from glm4serve.api.metrics import Metrics
from glm4serve.cli import build_parser, settings_from_args
from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.scheduler import Scheduler
from glm4serve.engine.speculative import MAX_DRAFT_PAUSE, SpeculativeConfig, ngram_draft
from glm4serve.engine.types import LENGTH, STOP, EngineStats, SamplingParams
from glm4serve.model.glm4 import load_model
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, make_seq, next_token, sched_config

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PERIOD = 5


def copying(ctx: list[int]) -> int:
    """A model that repeats what it said PERIOD tokens ago: its replies are what n-grams predict."""
    return ctx[-PERIOD] if len(ctx) >= PERIOD else next_token(ctx)


def copying_mostly(ctx: list[int]) -> int:
    """Repeats itself but every seventh position: drafts are kept in part, then rejected."""
    return next_token(ctx) if len(ctx) % 7 == 0 else copying(ctx)


def make_engine(spec, model, num_blocks=128, block_size=4, budget=64, max_model_len=None, peak=40.0, **args):
    pool = BlockPool(num_blocks, block_size)
    cfg = sched_config(max_num_seqs=16, max_num_batched_tokens=budget, block_size=block_size,
                       max_model_len=max_model_len or num_blocks * block_size, speculative_config=spec, **args)
    runner = FakeRunner(num_blocks, block_size, model=model, peak=peak)
    return LLMEngine(runner, FakeTokenizer(), cfg, pool, FakeTokenizer.stop_token_ids, vocab_size=VOCAB), runner


def run(engine, requests) -> dict:
    """Every request to its end: {(request id, index): [token ids, text, finish, stop, logprobs, outputs]}."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    got: dict = {}
    for _ in range(5000):
        if not engine.has_work:
            break
        for o in engine.step():
            c = got.setdefault((o.request_id, o.index), [[], "", None, None, [], 0])
            assert c[2] is None, "an output after the finish"
            assert o.logprobs is None or len(o.logprobs) == len(o.token_ids)
            assert o.num_output_tokens == len(c[0]) + len(o.token_ids)
            c[0] += o.token_ids
            c[1] += o.text
            c[2], c[3] = o.finish_reason, o.stop_reason
            c[4] += [(lp.token_id, round(lp.logprob, 4), [(t, round(v, 4)) for t, v in lp.top])
                     for lp in o.logprobs or []]
            c[5] += 1
    assert not engine.has_work and engine.pop_errors() == []
    assert engine.pool.num_free == engine.pool.num_blocks
    return got


def prompt_of(i: int, length: int) -> list[int]:
    return [10 + (i * 11 + j * 5) % 50 for j in range(length)]


def both(requests, model, **kw):
    plain, _ = make_engine(None, model, **kw)
    spec, runner = make_engine(SPEC, model, **kw)
    return run(plain, requests), run(spec, requests), spec, runner


def test_a_repeating_model_gives_the_same_tokens_in_fewer_forwards():
    requests = [(f"r{i}", prompt_of(i, 3 + 4 * i), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
                for i in range(4)]
    plain, spec, engine, runner = both(requests, copying)
    assert spec == {k: v[:5] + [spec[k][5]] for k, v in plain.items()}
    assert all(v[0] and v[2] == LENGTH for v in spec.values())
    assert engine.spec_accepted_tokens > 0.8 * engine.spec_draft_tokens > 0
    assert len(runner.steps) < 0.4 * sum(len(v[0]) for v in plain.values()) / len(requests)
    stats = engine.stats()
    assert (stats.spec_draft_tokens, stats.spec_accepted_tokens) == (engine.spec_draft_tokens,
                                                                     engine.spec_accepted_tokens)


def test_rejected_drafts_change_nothing_and_leave_nothing_in_the_cache():
    """A later prompt that extends an earlier reply reads the earlier reply's blocks from the prefix cache:
    a rejected draft token left in them would change its reply."""
    first = [("a", prompt_of(1, 9), SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True))]
    plain, _ = make_engine(None, copying_mostly)
    spec, _ = make_engine(SPEC, copying_mostly)
    a_plain, a_spec = run(plain, first), run(spec, first)
    assert a_spec[("a", 0)][:5] == a_plain[("a", 0)][:5]
    assert 0 < spec.spec_accepted_tokens < spec.spec_draft_tokens  # some kept, some rejected
    later = [("b", prompt_of(1, 9) + a_plain[("a", 0)][0][:37], SamplingParams(temperature=0.0, max_tokens=20))]
    b_plain, b_spec = run(plain, later), run(spec, later)
    assert b_spec[("b", 0)][:5] == b_plain[("b", 0)][:5]
    assert spec.scheduler.prefix_cache_hits >= 40  # the 46-token prompt found 10 of its blocks


def test_a_reply_that_refuses_its_drafts_drafts_less_and_less_often():
    """A model that never says what the lookup guesses: every draft fails, and after the first few the
    sequence drafts once in MAX_DRAFT_PAUSE + 1 steps."""

    def refusing(ctx: list[int]) -> int:
        guess, t = ngram_draft(ctx, 1, SPEC["prompt_lookup_min"], SPEC["prompt_lookup_max"]), next_token(ctx)
        return 10 + (t - 9) % 50 if guess == [t] else t

    requests = [("r", prompt_of(7, 20), SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))]
    plain, spec, engine, runner = both(requests, refusing)
    assert spec[("r", 0)][:5] == plain[("r", 0)][:5]
    drafted = [c for b in runner.steps for c in b.chunks if len(c.token_ids) > 1 and c.start >= 20]
    assert engine.spec_accepted_tokens == 0
    assert MAX_DRAFT_PAUSE == 15
    assert 5 <= len(drafted) <= 12  # after 1, 3, 7, then every 16 steps: ~10 drafts in 120 steps, not ~120


def test_seeded_sampling_penalties_and_logprobs_are_those_of_plain_decoding():
    """Each kept token is drawn from the row after the tokens kept before it, with the request's own
    generator: the same draws, in the same order, as one token a step."""
    requests = [
        ("s", prompt_of(2, 6), SamplingParams(temperature=1.0, seed=7, max_tokens=30, logprobs=2, ignore_eos=True)),
        ("n", prompt_of(3, 8), SamplingParams(temperature=0.8, top_p=0.9, seed=3, n=2, max_tokens=25,
                                              ignore_eos=True)),
        ("p", prompt_of(4, 5), SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.3, presence_penalty=0.5,
                                              frequency_penalty=0.2, max_tokens=25, ignore_eos=True)),
        ("g", prompt_of(5, 7), SamplingParams(temperature=0.0, max_tokens=30, logprobs=1, min_tokens=5)),
    ]
    plain, spec, engine, _ = both(requests, copying, peak=4.0)
    assert {k: v[:5] for k, v in spec.items()} == {k: v[:5] for k, v in plain.items()}
    assert engine.spec_accepted_tokens > 0


def test_stops_limits_and_context_end_inside_a_draft():
    """A stop string, a stop token, max_tokens and max_model_len met part-way through kept tokens end
    the reply there, as in plain decoding."""
    prompt = prompt_of(6, 8)
    reply = run(make_engine(None, copying)[0],
                [("x", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))])[("x", 0)]
    text, ids = reply[1], reply[0]
    requests = [
        ("stop-str", prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[text[17:20]])),
        ("stop-id", prompt, SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[ids[18]])),
        ("stop-incl", prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[text[17:19]],
                                             include_stop_str_in_output=True)),
        ("max", prompt, SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)),
        ("ctx", prompt, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)),
    ]
    plain, spec, engine, runner = both(requests, copying, max_model_len=31)
    assert spec == {k: v[:5] + [spec[k][5]] for k, v in plain.items()}
    assert [spec[(r, 0)][2] for r, _, _ in requests] == [STOP, STOP, STOP, LENGTH, LENGTH]
    assert len(spec[("max", 0)][0]) == 13 and len(spec[("ctx", 0)][0]) == 31 - len(prompt)
    assert all(c.start + len(c.token_ids) <= 31 for b in runner.steps for c in b.chunks)
    assert engine.spec_accepted_tokens > 0


def test_preempted_and_recomputed_sequences_keep_their_tokens():
    """A pool too small for everyone: sequences are preempted mid-draft-run and recomputed."""
    requests = [(f"r{i}", prompt_of(i, 5 + 3 * i), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                for i in range(5)]
    plain, spec, engine, _ = both(requests, copying_mostly, num_blocks=14, max_model_len=40)
    assert {k: v[:5] for k, v in spec.items()} == {k: v[:5] for k, v in plain.items()}
    assert engine.stats().num_preemptions_total > 0 and engine.spec_accepted_tokens > 0


def test_a_draft_takes_no_block_another_sequence_needs():
    """Two decoding sequences and two free blocks: the draft of the first is cut to the block its own next
    token takes, so the second's next token still has one and nothing is preempted."""
    cfg = sched_config(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4,
                       speculative_config=SPEC)
    pool = BlockPool(16, 4)
    sched = Scheduler(cfg, pool)
    a = make_seq(0, [10, 11, 12, 13, 14, 15, 10, 11], max_tokens=50)
    b = make_seq(1, [20, 21, 22, 23, 24, 25, 26, 27], max_tokens=50)
    for s in (a, b):
        sched.add([s])
    out = sched.schedule()
    sched.on_step_done(out)
    a.output_token_ids.append(12)  # "10 11 12" recurs: the draft is 13 14 15 10, positions 9..12
    b.output_token_ids.append(28)  # both at 9 tokens: the next lands in a third block
    held = pool.allocate(pool.num_free - 2)  # someone else holds all but two blocks
    out = sched.schedule()
    assert out.preempted == []
    [sa, sb] = out.scheduled
    assert (sa.seq, sb.seq) == (a, b)
    assert sa.draft == [13, 14, 15] and sa.token_ids == [12, 13, 14, 15]  # positions 8..11: its third block
    assert sb.draft == [] and sb.num_tokens == 1 and pool.num_free == 0
    # the first drafted token kept: the second's slot stays in the block of the token after it
    sched.on_step_done(out)
    a.output_token_ids += [13, 10]
    sched.keep_draft_token(sa)
    sched.accept_draft(sa, 1)
    assert a.num_computed_tokens == 10 and len(a.block_table) == 3
    # with room, the whole draft; a rejection gives back the block that held only drafted tokens
    pool.free(held)
    out = sched.schedule()
    sched.on_step_done(out)
    sa = next(s for s in out.scheduled if s.seq is a)
    assert sa.token_ids == [10, 11, 12, 13, 10] and len(a.block_table) == 4  # positions 10..14
    a.output_token_ids.append(50)
    sched.accept_draft(sa, 0)
    assert a.num_computed_tokens == 11 and len(a.block_table) == 3


def test_drafts_take_only_what_decodes_and_prefills_leave_of_the_budget():
    """A step of 5 tokens: a long reply's drafts would fill it, yet a new request starts at once and each
    decode comes before any draft."""
    engine, runner = make_engine(SPEC, copying, budget=5)
    engine.add_request("long", prompt_of(1, 8), SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert [len(c.token_ids) for c in runner.steps[-1].chunks] == [5]  # a token and a draft of 4
    engine.add_request("short", prompt_of(2, 3), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.step()
    assert sorted(len(c.token_ids) for c in runner.steps[-1].chunks) == [2, 3]  # its prompt; a draft of the 1 left
    engine.step()
    assert sorted(len(c.token_ids) for c in runner.steps[-1].chunks) == [1, 4]  # both decode; 3 left to draft
    while engine.has_work:
        engine.step()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_no_drafts_while_more_sequences_run_than_disable_by_batch_size():
    requests = [(f"r{i}", prompt_of(i, 6), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
                for i in range(3)]
    for limit, drafts in ((3, True), (2, False)):
        engine, _ = make_engine({**SPEC, "disable_by_batch_size": limit}, copying)
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        engine.step()  # the three prefills
        engine.step()
        assert (engine.spec_draft_tokens > 0) is drafts
        engine.abort("r0")  # two left
        engine.step()
        assert engine.spec_draft_tokens > 0
        while engine.has_work:
            engine.step()
        assert engine.pool.num_free == engine.pool.num_blocks


def test_a_draft_evicts_no_cached_prefix():
    """Every free block holds a cached prefix: the next token may evict one, its draft may not."""
    cfg = sched_config(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, block_size=4,
                       speculative_config=SPEC)
    pool = BlockPool(8, 4)
    sched = Scheduler(cfg, pool)
    a = make_seq(0, [10, 11, 12, 13, 14, 15, 10, 11], max_tokens=20)
    sched.add([a])
    sched.on_step_done(sched.schedule())
    a.output_token_ids.append(12)  # the draft would be 13 14 15 10, positions 9..12: blocks 3 and 4
    others = pool.allocate(pool.num_free)
    for i, block in enumerate(others):
        pool.register(block, bytes([i]) * 32)
    pool.free(others)
    assert pool.num_empty == 0 and pool.num_free == 6
    [s] = sched.schedule().scheduled
    assert s.draft == [13, 14, 15] and pool.num_evictions == 1  # the block of positions 8..11 only


def test_the_draft_is_the_latest_longest_earlier_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 1, 3) == [7, 5, 1]  # the later of two 3-grams
    assert ngram_draft([1, 2, 3, 9, 5, 3, 8, 8, 2, 3], 5, 1, 3) == [9, 5, 3, 8, 8]  # "2 3" beats the later "3"
    assert ngram_draft([1, 2, 3, 9, 5, 3, 8, 8, 2, 3], 5, 3, 3) == []  # no earlier 3-gram
    assert ngram_draft([4, 5, 6, 4, 5], 8, 1, 2) == [6, 4, 5]  # what follows, up to the end
    assert ngram_draft([4, 4, 4, 4], 2, 1, 2) == [4]
    assert ngram_draft([4], 2, 1, 1) == [] and ngram_draft([4, 5, 4], 0, 1, 1) == []


def test_the_lookup_equals_a_plain_search_and_reads_a_sequences_growing_array():
    def plain_search(t: list[int], k: int, lo: int, hi: int) -> list[int]:
        for n in range(min(hi, len(t) - 1), lo - 1, -1):
            for i in range(len(t) - 1 - n, -1, -1):  # windows t[i:i + n] ending before the last token
                if t[i : i + n] == t[len(t) - n :]:
                    return t[i + n : i + n + k]
        return []

    rng = random.Random(0)
    for _ in range(300):
        t = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        for lo, hi in ((1, 1), (1, 3), (2, 4), (3, 3)):
            assert ngram_draft(t, 3, lo, hi) == plain_search(t, 3, lo, hi) == ngram_draft(np.array(t), 3, lo, hi)
    seq = make_seq(0, [5, 6, 7])
    for t in range(100):
        assert seq.token_array().tolist() == seq.all_token_ids
        seq.output_token_ids.append(t)


def test_config_is_read_as_vllm_writes_it():
    as_json = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    spec = EngineArgs(speculative_config=as_json).speculative_config
    assert (spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (4, 3, 3)
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2}).prompt_lookup_min == 5  # vLLM's default
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_min": 2}).prompt_lookup_max == 2
    args = build_parser().parse_args(["serve", "--speculative-config", as_json])
    assert settings_from_args(args).speculative_config == spec
    assert all(EngineArgs(**off).speculative_config is None
               for off in ({}, {"speculative_config": ""}, {"speculative_config": "null"}))
    for bad in ('{"method": "eagle", "num_speculative_tokens": 2}', '{"num_speculative_tokens": 0}',
                '{"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
                '{"num_speculative_tokens": 2, "model": "x"}', "not json"):
        with pytest.raises(ValueError):
            EngineArgs(speculative_config=bad)


def test_metrics_count_drafted_and_kept_tokens():
    metrics = Metrics(lambda: EngineStats(spec_draft_tokens=12, spec_accepted_tokens=5), "m").render().decode()
    assert 'glm4serve:spec_decode_num_draft_tokens_total{model_name="m"} 12.0' in metrics
    assert 'glm4serve:spec_decode_num_accepted_tokens_total{model_name="m"} 5.0' in metrics


def test_a_random_glm4_decodes_the_same_greedy_tokens(make_checkpoint, device):
    """The model's real paged attention over a draft chunk (a short prefill after the cache) gives the
    logits of one token at a time."""
    path = make_checkpoint()
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, tokenizer.vocab_size, (6,), generator=g).tolist()
    requests = [(f"r{i}", motif * (2 + i) + motif[:i], SamplingParams(temperature=0.0, max_tokens=24,
                                                                       ignore_eos=True)) for i in range(3)]

    def tokens(spec):
        model = load_model(path, dtype="float32", device=device)
        runner = make_runner(model, 64, 4, vocab_limit=tokenizer.vocab_size, max_num_seqs=8, max_model_len=256)
        cfg = sched_config(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256, block_size=4,
                           speculative_config=spec)
        engine = LLMEngine(runner, tokenizer, cfg, BlockPool(64, 4), tokenizer.stop_token_ids)
        return {k: v[0] for k, v in run(engine, requests).items()}, engine

    plain, _ = tokens(None)
    spec, engine = tokens(SPEC)
    assert engine.spec_draft_tokens > 0
    assert spec == plain


def test_structured_output_is_that_of_plain_decoding(make_checkpoint):
    """A JSON schema's grammar masks each drafted position after the tokens kept before it."""
    from glm4serve.engine.types import GuidedSpec
    from glm4serve.server import build_llm_engine

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
              "required": ["name", "tags"]}
    args = dict(model=str(make_checkpoint()), dtype="float32", kv_cache_memory=16 << 20, max_model_len=512)
    prompt = list(range(20, 60))

    def replies(spec):
        engine = build_llm_engine(EngineArgs(**args, speculative_config=spec))
        requests = [(f"j{i}", prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=i,
                                                     guided=GuidedSpec.json_schema(schema))) for i in range(6)]
        return {k: v[:4] for k, v in run(engine, requests).items()}, engine

    plain, _ = replies(None)
    spec, engine = replies({**SPEC, "prompt_lookup_min": 1})
    assert spec == plain
    assert engine.spec_draft_tokens > 0


@pytest.mark.parametrize("max_tokens", [29, 30, 31])
def test_a_reply_that_ends_on_kept_drafted_tokens_leaves_them_in_the_prefix_cache(max_tokens):
    """The token that ends a reply may come from a draft's rows: the kept tokens before it were computed,
    and the next turn's prompt (prompt + reply) finds them cached, as after plain decoding."""
    cached, drafted = {}, {}
    prompt = prompt_of(1, 9)
    for spec in (None, SPEC):
        engine, _ = make_engine(spec, copying)
        [reply] = [c[0] for c in run(engine, [("a", prompt, SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True))]).values()]
        engine.add_request("b", prompt + reply, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        outs = []
        while engine.has_work:
            outs += engine.step()
        cached[bool(spec)] = outs[-1].num_cached_tokens
        drafted[bool(spec)] = engine.spec_accepted_tokens
        assert engine.pool.num_free == engine.pool.num_blocks
    assert drafted[True] > 0  # drafts were kept: the case is exercised
    assert cached[True] == cached[False] == (len(prompt) + max_tokens - 1) // 4 * 4
