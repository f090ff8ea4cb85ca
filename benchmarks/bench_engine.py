"""Engine benchmarks: continuous batching, streaming and sampling, every figure a ratio measured in the same run.

GLM-4-shaped random checkpoint, float32, full 151,552-token vocabulary, hidden 512, 4 layers;
prompt 32 tokens, 128 new tokens (greedy, ignore_eos), 2 threads.

1. single stream: our engine's tokens/s vs transformers generate(); fraction of the roofline
   (weight bytes read per token / measured memory read bandwidth).
2. 32 concurrent requests: our aggregate tokens/s vs transformers generate() on a static batch of 32.
3. time to first token of a 4K-token prompt while 16 other requests decode, and the decode stall
   it causes (the 16 decoders' longest gap between tokens vs their median gap).

    .venv/bin/python benchmarks/bench_engine.py [--new-tokens 128] [--repeats 3] [--skip-hf]

Throughputs are the median of --repeats runs, ours and transformers alike (all runs printed): on
the project's shared box one run can be 10-20% off.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

# Before torch is imported: transformers' weights on transparent huge pages too, as our CPU runner
# puts its own weights and KV cache (1-3% faster decode there), so that neither side lacks them.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from bench_long_prefill import beside_decoders  # noqa: E402 - benchmarks/ is the script's folder
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.cpu_linear import CpuLinear
from glm4serve.model.random_checkpoint import write_random_checkpoint
from glm4serve.server import build_llm_engine

SHAPE = dict(variant="glm", layout="hf", vocab_size=151552, hidden_size=512, intermediate_size=1536,
             num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=5e6)


def read_bandwidth_gbs(x: torch.Tensor | None = None) -> float:
    """Best of several full reads (torch's sum) of x, by default a fresh 1 GiB fp32 tensor."""
    x = torch.ones(1 << 28) if x is None else x
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def model_read_bandwidth_gbs(engine: LLMEngine) -> float:
    """The same reads over the model's largest weight (the output layer). On the project's VM the
    read bandwidth depends on where a process's pages landed (we saw ~33 and ~55 GB/s for the
    same tensor in different processes), so the roofline uses the faster of this and the probe."""
    head = engine.runner.model.lm_head
    weight = getattr(head, "plain", None)  # a CpuLinear's plain weight; a packed one has none to read
    if weight is None:
        weight = getattr(head, "weight", None)
    return 0.0 if weight is None else read_bandwidth_gbs(weight)


def weight_bytes_per_token(engine: LLMEngine) -> int:
    """Every weight is read once per decode step except the embedding (one row)."""
    total = 0
    for name, mod in engine.runner.model.named_modules():
        if name == "embed":
            continue
        total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        if isinstance(mod, CpuLinear):  # its weight is no parameter (packed or plain, read once)
            total += mod.in_features * mod.out_features * 4 + (0 if mod.bias is None else mod.bias.numel() * 4)
    return total


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2000, (length,), generator=g).tolist() for _ in range(n)]


def run_engine(engine: LLMEngine, batch: list[list[int]], new_tokens: int) -> float:
    """Wall time for every request to produce new_tokens tokens."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", p, params)
    n = 0
    while engine.has_work:
        n += sum(len(o.token_ids) for o in engine.step())
    dt = time.perf_counter() - t0
    assert n == len(batch) * new_tokens, n
    return dt


def run_hf(model, batch: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def median_rate(work: float, timed, repeats: int) -> tuple[float, str]:
    """work / time for `repeats` calls of timed() -> (median rate, "r1 / r2 / ...")."""
    rates = [work / timed() for _ in range(repeats)]
    return statistics.median(rates), " / ".join(f"{r:.1f}" for r in rates)


def ttft_under_load(engine: LLMEngine, long_len: int, decoders: int, seed: int = 8) -> None:
    d = beside_decoders(engine, prompts(1, long_len, seed=seed)[0], prompts(decoders, 32, seed=7), warm_steps=10)
    print(f"TTFT of a {long_len}-token prompt with {decoders} requests decoding: {d['first'] * 1e3:.0f} ms "
          f"over {d['steps']} steps; decoders' token gap: median {d['usual'] * 1e3:.1f} ms before, "
          f"max {d['max'] * 1e3:.1f} ms / median {d['median'] * 1e3:.1f} ms during "
          f"(stall {d['max'] / d['usual']:.1f}x the usual gap)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    bw = read_bandwidth_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory read bandwidth {bw:.1f} GB/s")
    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(d, **SHAPE)
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", max_num_seqs=64,
                                             max_num_batched_tokens=2048, kv_cache_memory=1 << 30))
        hf = None
        if not a.skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    wbytes = weight_bytes_per_token(engine)
    model_bw = model_read_bandwidth_gbs(engine)
    roof = max(bw, model_bw) * 1e9 / wbytes
    print(f"weights read per decoded token: {wbytes / 1e6:.0f} MB; the output layer's weight reads at "
          f"{model_bw:.1f} GB/s -> roofline {roof:.0f} tokens/s")

    one = prompts(1, a.prompt_tokens)
    run_engine(engine, one, 8)  # warm-up
    # the output layer's read speed right after each run says whether it ran in slow or fast memory
    rates: list[float] = []
    reads: list[float] = []

    def single_run() -> float:
        dt = run_engine(engine, one, a.new_tokens)
        rates.append(a.new_tokens / dt)
        reads.append(model_read_bandwidth_gbs(engine))
        return dt

    ours1, runs = median_rate(a.new_tokens, single_run, a.repeats)
    line = f"single stream: ours {ours1:.1f} tokens/s ({ours1 / roof:.0%} of roofline; runs {runs}"
    if all(reads):
        own = " / ".join(f"{r / (gbs * 1e9 / wbytes):.0%}" for r, gbs in zip(rates, reads))
        line += (f"; the output layer read at {' / '.join(f'{gbs:.1f}' for gbs in reads)} GB/s right after "
                 f"each, so {own} of each run's own roofline")
    line += ")"
    if hf is not None:
        run_hf(hf, one, 4)
        ref1, runs = median_rate(a.new_tokens, lambda: run_hf(hf, one, a.new_tokens), a.repeats)
        line += f", transformers generate() {ref1:.1f} tokens/s (runs {runs}), ratio {ours1 / ref1:.2f}x"
    print(line)

    many = prompts(a.batch, a.prompt_tokens, seed=1)
    oursb, runs = median_rate(a.batch * a.new_tokens, lambda: run_engine(engine, many, a.new_tokens), a.repeats)
    line = f"{a.batch} concurrent: ours {oursb:.0f} tokens/s aggregate (runs {runs})"
    if hf is not None:
        refb, runs = median_rate(a.batch * a.new_tokens, lambda: run_hf(hf, many, a.new_tokens), a.repeats)
        line += f", transformers generate() static batch {refb:.0f} tokens/s (runs {runs}), ratio {oursb / refb:.2f}x"
    print(line)

    ttft_under_load(engine, 4096, 16, seed=8)
    print("the same 4096-token prompt again (its blocks are in the prefix cache):")
    ttft_under_load(engine, 4096, 16, seed=8)
    # the step token budget trades the long prompt's TTFT against the others' stall
    engine.scheduler.cfg = dataclasses.replace(engine.scheduler.cfg, max_num_batched_tokens=512)
    print("a new 4096-token prompt with a step budget of 512 tokens instead of 2048:")
    ttft_under_load(engine, 4096, 16, seed=9)


if __name__ == "__main__":
    main()
