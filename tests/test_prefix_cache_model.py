"""Prefix caching over the real ModelRunner and a small random GLM-4 on the test device (`--device`):
K/V reused from the cache must give the very greedy tokens a full recompute gives, through forks,
eviction and preemption."""

from __future__ import annotations

import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.glm4 import load_model
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from tests.engine_fakes import RecordingRunner, sched_config


def run(path, tokenizer, waves, num_blocks, caching, budget=16, block_size=4, max_model_len=64, device="cpu"):
    """Each wave of requests is added once the previous one has finished, so later waves find the
    earlier ones' blocks in the cache (when those survived eviction)."""
    runner = RecordingRunner(make_runner(load_model(path, dtype="float32", device=device), num_blocks, block_size,
                                         vocab_limit=tokenizer.vocab_size, max_num_seqs=8,
                                         max_model_len=max_model_len))
    cfg = sched_config(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          block_size=block_size, enable_prefix_caching=caching)
    pool = BlockPool(num_blocks, block_size)
    engine = LLMEngine(runner, tokenizer, cfg, pool, tokenizer.stop_token_ids)
    tokens: dict = {}
    for wave in waves:
        for rid, prompt, params in wave:
            engine.add_request(rid, prompt, params)
        for _ in range(2000):
            if not engine.has_work:
                break
            for o in engine.step():
                tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
        assert not engine.has_work and engine.pop_errors() == []
        assert pool.num_free == pool.num_blocks  # idle: cached blocks all count as free
    return tokens, engine.stats(), pool, runner.min_gap


def test_greedy_tokens_are_the_same_with_and_without_prefix_caching(make_checkpoint, device):
    path = make_checkpoint()
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    system = rand(21)  # a long shared head, 5 full blocks and a bit
    greedy = lambda **kw: SamplingParams(temperature=0.0, ignore_eos=True, **kw)  # noqa: E731
    first = [
        ("a", system + rand(6), greedy(max_tokens=10)),
        ("n3", system + rand(3), greedy(max_tokens=8, n=3)),
        ("b", system + rand(9), greedy(max_tokens=7)),
    ]
    second = [
        ("a-again", first[0][1], greedy(max_tokens=10)),  # the whole prompt cached: last token recomputed
        ("c", system + rand(12), greedy(max_tokens=9, n=2)),
        ("d", rand(17), greedy(max_tokens=12)),
        ("b-longer", first[2][1] + rand(4), greedy(max_tokens=6)),
    ]
    waves = [first, second]

    off, off_stats, _, gap_off = run(path, tokenizer, waves, num_blocks=64, caching=False, device=device)
    roomy, roomy_stats, _, gap_roomy = run(path, tokenizer, waves, num_blocks=64, caching=True, device=device)
    tight, tight_stats, tight_pool, gap_tight = run(path, tokenizer, waves, num_blocks=16, caching=True,
                                                    device=device)

    assert min(gap_off, gap_roomy, gap_tight) > 1e-4, "a near tie: pick another seed"
    assert off_stats.prefix_cache_hits == 0 and off_stats.num_preemptions_total == 0
    assert roomy_stats.prefix_cache_hits >= 4 * 20 and roomy_stats.num_preemptions_total == 0
    assert tight_stats.num_preemptions_total > 0 and tight_pool.num_evictions > 0
    assert tight_stats.prefix_cache_hits > 0
    assert roomy == off
    assert tight == off
    assert off[("a-again", 0)] == off[("a", 0)]
    assert off[("n3", 0)] == off[("n3", 1)] == off[("n3", 2)]
