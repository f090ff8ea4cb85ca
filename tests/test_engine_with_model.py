"""The engine over the real ModelRunner and a small random GLM-4: paging, chunked prefill,
preemption and n > 1 copy-on-write must not change a single greedy token."""

from __future__ import annotations

import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.glm4 import load_model
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from tests.engine_fakes import RecordingRunner, sched_config


def run_engine(path, tokenizer, requests, num_blocks, block_size, budget, max_model_len):
    """The engine over the runner `glm4serve serve` would pick (fp32 on CPU: the CPU runner)."""
    runner = RecordingRunner(make_runner(load_model(path, dtype="float32"), num_blocks, block_size,
                                         vocab_limit=tokenizer.vocab_size))
    cfg = sched_config(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          block_size=block_size)
    pool = BlockPool(num_blocks, block_size)
    engine = LLMEngine(runner, tokenizer, cfg, pool, tokenizer.stop_token_ids)
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    tokens: dict = {}
    for _ in range(2000):
        if not engine.has_work:
            break
        for o in engine.step():
            tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
    assert not engine.has_work and engine.pop_errors() == []
    assert pool.num_free == pool.num_blocks
    return tokens, engine.stats().num_preemptions_total, runner


def test_tiny_pool_and_small_budget_give_the_same_greedy_tokens(make_checkpoint):
    path = make_checkpoint()
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    params = dict(temperature=0.0, ignore_eos=True)
    requests = [
        ("a", prompt(13), SamplingParams(max_tokens=12, **params)),
        ("n3", prompt(10), SamplingParams(max_tokens=9, n=3, **params)),
        ("b", prompt(30), SamplingParams(max_tokens=6, **params)),
        ("c", prompt(5), SamplingParams(max_tokens=14, **params)),
    ]
    roomy, pre_roomy, r1 = run_engine(path, tokenizer, requests, num_blocks=64, block_size=4, budget=512,
                                      max_model_len=64)
    tight, pre_tight, r2 = run_engine(path, tokenizer, requests, num_blocks=12, block_size=4, budget=7,
                                      max_model_len=48)
    assert pre_roomy == 0 and pre_tight > 0
    assert r1.copies == 2  # n=3 over a 10-token prompt: two choices copy the shared partial block
    assert min(r1.min_gap, r2.min_gap) > 1e-4, "a near tie: pick another seed"
    assert tight == roomy
    assert roomy[("n3", 0)] == roomy[("n3", 1)] == roomy[("n3", 2)]


def test_eight_prompts_together_equal_one_at_a_time(make_checkpoint):
    path = make_checkpoint("glm4", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 7, 19, 1, 25, 11, 60)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    together, _, r = run_engine(path, tokenizer, requests, num_blocks=128, block_size=16, budget=64, max_model_len=128)
    alone = {}
    for req in requests:
        alone.update(run_engine(path, tokenizer, [req], num_blocks=128, block_size=16, budget=64, max_model_len=128)[0])
    assert r.min_gap > 1e-4, "a near tie: pick another seed"
    assert together == alone


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(make_checkpoint):
    path = make_checkpoint("glm", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    seeded = ("s", [5, 6, 7, 8, 9], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True))
    alone, _, _ = run_engine(path, tokenizer, [seeded], num_blocks=128, block_size=16, budget=64, max_model_len=128)
    others = [(f"o{i}", [20 + i] * (3 + 5 * i), SamplingParams(max_tokens=5 + i, temperature=0.7, ignore_eos=True))
              for i in range(5)]
    crowded, _, _ = run_engine(path, tokenizer, others[:2] + [seeded] + others[2:], num_blocks=128, block_size=16,
                               budget=24, max_model_len=128)
    assert crowded[("s", 0)] == alone[("s", 0)]
