"""The engine over the real ModelRunner and a small random GLM-4 on the test device (`--device`):
paging, chunked prefill, preemption and n > 1 copy-on-write must not change a single greedy token."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import GPU_MEMORY_FRACTION, EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.glm4 import load_model
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from glm4serve.server import build_llm_engine
from tests.engine_fakes import RecordingRunner, sched_config


def run_engine(path, tokenizer, requests, num_blocks, block_size, budget, max_model_len, device="cpu",
               dtype="float32", max_num_seqs=16):
    """The engine over the runner `glm4serve serve` would pick (fp32 on CPU: the CPU runner; on a GPU
    the CUDA graph runner)."""
    runner = RecordingRunner(make_runner(load_model(path, dtype=dtype, device=device), num_blocks, block_size,
                                         vocab_limit=tokenizer.vocab_size, max_num_seqs=16,
                                         max_model_len=max_model_len))
    cfg = sched_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                       block_size=block_size)
    pool = BlockPool(num_blocks, block_size)
    engine = LLMEngine(runner, tokenizer, cfg, pool, tokenizer.stop_token_ids)
    return drive(engine, requests), engine.stats().num_preemptions_total, runner


def drive(engine: LLMEngine, requests) -> dict:
    """Every request to its end: {(request id, choice index): token ids}; the KV pool all free again."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    tokens: dict = {}
    for _ in range(2000):
        if not engine.has_work:
            break
        for o in engine.step():
            tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
    assert not engine.has_work and engine.pop_errors() == []
    assert engine.pool.num_free == engine.pool.num_blocks
    return tokens


def test_tiny_pool_and_small_budget_give_the_same_greedy_tokens(make_checkpoint, device):
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
                                      max_model_len=64, device=device)
    tight, pre_tight, r2 = run_engine(path, tokenizer, requests, num_blocks=12, block_size=4, budget=7,
                                      max_model_len=48, device=device)
    assert pre_roomy == 0 and pre_tight > 0
    assert r1.copies == 2  # n=3 over a 10-token prompt: two choices copy the shared partial block
    assert min(r1.min_gap, r2.min_gap) > 1e-4, "a near tie: pick another seed"
    assert tight == roomy
    assert roomy[("n3", 0)] == roomy[("n3", 1)] == roomy[("n3", 2)]


EIGHT_LENGTHS = (3, 40, 7, 19, 1, 25, 11, 60)


def test_eight_prompts_together_equal_one_at_a_time(make_checkpoint, device):
    path = make_checkpoint("glm4", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist() for n in EIGHT_LENGTHS]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    together, _, r = run_engine(path, tokenizer, requests, num_blocks=128, block_size=16, budget=64, max_model_len=128,
                                device=device)
    alone = {}
    for req in requests:
        alone.update(run_engine(path, tokenizer, [req], num_blocks=128, block_size=16, budget=64, max_model_len=128,
                                device=device)[0])
    assert r.min_gap > 1e-4, "a near tie: pick another seed"
    assert together == alone


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(make_checkpoint, device):
    path = make_checkpoint("glm", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    seeded = ("s", [5, 6, 7, 8, 9], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True))
    alone, _, _ = run_engine(path, tokenizer, [seeded], num_blocks=128, block_size=16, budget=64, max_model_len=128,
                             device=device)
    others = [(f"o{i}", [20 + i] * (3 + 5 * i), SamplingParams(max_tokens=5 + i, temperature=0.7, ignore_eos=True))
              for i in range(5)]
    crowded, _, _ = run_engine(path, tokenizer, others[:2] + [seeded] + others[2:], num_blocks=128, block_size=16,
                               budget=24, max_model_len=128, device=device)
    assert crowded[("s", 0)] == alone[("s", 0)]


def test_the_engines_seed_makes_unseeded_draws_repeat(make_checkpoint, device):
    """vLLM's --seed: engines built with one seed draw the same for the same unseeded requests; another seed
    draws otherwise."""
    path = str(make_checkpoint("glm", "hf", "wide"))
    unseeded = [(f"r{i}", [5, 6, 7, 8 + i], SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, n=2))
                for i in range(3)]

    def draws(seed):
        engine = build_llm_engine(EngineArgs(model=path, dtype="float32", device=device, num_kv_blocks=64,
                                             block_size=16, max_model_len=128, seed=seed))
        try:
            return drive(engine, unseeded)
        finally:
            engine.close()

    first = draws(7)
    torch.rand(100)  # whatever drew from the generator in between
    assert draws(7) == first
    assert draws(8) != first


def test_choices_past_max_num_seqs_sample_as_those_seated_together(make_checkpoint, device):
    path = make_checkpoint("glm", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    n3 = ("n3", [5, 6, 7, 8, 9] * 4, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    together, _, _ = run_engine(path, tokenizer, [n3], num_blocks=64, block_size=4, budget=64, max_model_len=64,
                                device=device)
    one_seat, _, _ = run_engine(path, tokenizer, [n3], num_blocks=64, block_size=4, budget=64, max_model_len=64,
                                device=device, max_num_seqs=1)
    assert one_seat == together and len({tuple(t) for t in together.values()}) == 3


@pytest.mark.parametrize("variant", ["glm", "glm4"])
def test_served_engine_greedy_equals_transformers_generate(make_checkpoint, device, variant):
    """The engine as `glm4serve serve` builds it (build_llm_engine), sampler included."""
    path = make_checkpoint(variant, "hf", "wide")
    llm = build_llm_engine(EngineArgs(model=str(path), dtype="float32", device=device, num_kv_blocks=128,
                                      block_size=16, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128))
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    padding = list(range(llm.tokenizer.vocab_size, ref.config.vocab_size))  # rows past the tokenizer: never ours
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0, suppress_tokens=padding or None)
    got = drive(llm, [("g", prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))])
    assert got[("g", 0)] == expected[0, len(prompt):].tolist()


def test_served_logprobs_are_the_models_own_whatever_the_temperature(make_checkpoint, device):
    path = make_checkpoint("glm4", "hf", "wide")
    llm = build_llm_engine(EngineArgs(model=str(path), dtype="float32", device=device, num_kv_blocks=128,
                                      block_size=16, max_model_len=128))
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    llm.add_request("r", prompt, SamplingParams(max_tokens=8, temperature=0.5, seed=1, logprobs=0, ignore_eos=True))
    tokens, logprobs = [], []
    while llm.has_work:
        for o in llm.step():
            tokens += o.token_ids
            logprobs += [lp.logprob for lp in o.logprobs]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():  # the logits before each generated token, over the tokenizer's ids
        logits = ref(torch.tensor([prompt + tokens], device=device)).logits[0, len(prompt) - 1 : -1]
    logits = logits[:, : llm.tokenizer.vocab_size].float()
    # vLLM's default raw_logprobs (the one mode served): not those of the temperature-0.5 distribution sampled
    expected = logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=device)[:, None]).squeeze(1)
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="raw_logprobs"):  # vLLM's other modes are refused, never served as raw
        EngineArgs(logprobs_mode="processed_logprobs")


@pytest.mark.cuda
def test_bf16_tokens_leave_float32_ones_only_at_near_ties(make_checkpoint, device, tolerances):
    """bf16 rounding depends on the batch's shape, so bf16 greedy tokens may differ from float32 ones
    where float32's best two logits are within bf16's error; anywhere else they must not."""
    path = make_checkpoint("glm4", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist() for n in EIGHT_LENGTHS]
    requests = [(f"r{i}", p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(prompts)]
    fp32, _, _ = run_engine(path, tokenizer, requests, num_blocks=128, block_size=16, budget=64, max_model_len=128,
                            device=device)
    bf16, preemptions, _ = run_engine(path, tokenizer, requests, num_blocks=30, block_size=4, budget=16,
                                      max_model_len=120, device=device, dtype="bfloat16")
    assert preemptions > 0  # the tight pool recomputes in other batch shapes
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    allowed = 2 * tolerances["bfloat16"].floor  # each of the two logits may be off by the bound
    for i, prompt in enumerate(prompts):
        a, b = fp32[(f"r{i}", 0)], bf16[(f"r{i}", 0)]
        first = next((t for t in range(len(a)) if a[t] != b[t]), None)
        if first is None:
            continue
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + a[:first]], device=device)).logits[0, -1].float()
        top2 = logits.topk(2).values
        gap, scale = (top2[0] - top2[1]).item(), max(logits.abs().max().item(), 1.0)
        assert gap <= allowed * scale, f"r{i}: bf16 left float32 at token {first} where the gap was {gap:.3g}"


def test_the_load_log_says_the_cache_capped_the_context_only_where_it_did(make_checkpoint, caplog):
    path = str(make_checkpoint())
    for max_model_len, capped in ((64, False), (None, True)):  # asked for 64 tokens; the cache holds 64 of 131072
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="glm4serve"):
            llm = build_llm_engine(EngineArgs(model=path, dtype="float32", num_kv_blocks=4, block_size=16,
                                              max_model_len=max_model_len))
        assert llm.max_model_len == 64
        assert ("context capped at 64 tokens by the KV cache budget" in caplog.text) == capped, caplog.text


@pytest.mark.cuda
def test_automatic_kv_budget_fills_the_card_after_the_weights(make_checkpoint):
    """No kv_cache_memory on a GPU: the KV cache takes what the loaded weights leave of
    GPU_MEMORY_FRACTION of the card (sized before the weights, it would leave them no room)."""
    gc.collect()
    torch.cuda.empty_cache()
    path = make_checkpoint("glm", "hf", "wide")
    llm = build_llm_engine(EngineArgs(model=str(path), dtype="bfloat16", device="cuda"))
    try:
        free, total = torch.cuda.mem_get_info()
        used, goal = total - free, GPU_MEMORY_FRACTION * total
        assert goal - (1 << 30) <= used <= goal + (256 << 20), f"{used / 2**30:.1f} GiB used, {goal / 2**30:.1f} planned"
        assert llm.max_model_len == llm.runner.model.cfg.max_position_embeddings  # a big card: the model's context
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        got = drive(llm, [(f"r{i}", list(range(3, 40 + i)), params) for i in range(4)])
        assert all(len(t) == 8 for t in got.values())
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def test_prompt_logprobs_equal_transformers_through_chunks_preemption_and_a_cached_prefix(make_checkpoint, device):
    """Prompt logprobs from prefill chunks of 5 tokens, a pool so small that the requests preempt each
    other, and the prompt already in the prefix cache: each equals transformers' log-softmax of its
    forward over the whole prompt, rank and top 3 included; the siblings of n=2 report the same."""
    path = make_checkpoint("glm", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, tokenizer.vocab_size, (37,), generator=g).tolist()
    runner = make_runner(load_model(path, dtype="float32", device=device), 16, 4, vocab_limit=tokenizer.vocab_size)
    cfg = sched_config(max_num_seqs=8, max_num_batched_tokens=5, max_model_len=60, block_size=4)
    engine = LLMEngine(runner, tokenizer, cfg, BlockPool(16, 4), tokenizer.stop_token_ids)
    greedy = dict(temperature=0.0, ignore_eos=True)
    drive(engine, [("warm", prompt, SamplingParams(max_tokens=2, **greedy))])  # the prompt's blocks now cached
    requests = [("p", prompt, SamplingParams(max_tokens=20, n=2, prompt_logprobs=3, **greedy)),
                ("q", prompt[:20], SamplingParams(max_tokens=20, **greedy))]
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    firsts = {}
    while engine.has_work:
        for o in engine.step():
            if o.num_output_tokens == 1:
                firsts[(o.request_id, o.index)] = o
    assert engine.pop_errors() == [] and engine.pool.num_free == engine.pool.num_blocks
    assert engine.stats().num_preemptions_total > 0
    got = firsts[("p", 0)]
    assert got.num_cached_tokens == 0 and firsts[("p", 1)].prompt_logprobs is got.prompt_logprobs
    assert firsts[("q", 0)].prompt_logprobs is None

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([prompt], device=device)).logits[0, :, : tokenizer.vocab_size]
    expected = logits.float().log_softmax(-1).cpu()  # [L, V]: row p predicts token p + 1
    lps = got.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for p in range(1, len(prompt)):
        row, lp = expected[p - 1], lps[p]
        want = row[prompt[p]].item()
        assert lp.token_id == prompt[p] and abs(lp.logprob - want) < 1e-4, p
        assert int((row > want + 1e-4).sum()) + 1 <= lp.rank <= int((row > want - 1e-4).sum()) + 1, p
        assert [v for _, v in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert [abs(row[t].item() - v) < 1e-4 for t, v in lp.top] == [True] * 3
