"""Model-level benchmarks: the GLM-4 model over its paged KV cache.

1. Prefill of one 131,072-token prompt on a small model, in chunks: tokens/s and peak memory,
   next to the bound weights + KV cache.
2. Decode step time at batch 1 and batch 32 (context 128) on a GLM-4-shaped checkpoint, ours
   against transformers' forward with its own DynamicCache on the same weights, same run.

    .venv/bin/python benchmarks/bench_model.py [--prefill-tokens 131072] [--skip-prefill] [--skip-decode]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import torch

from glm4serve.model.batch import SeqChunk, build_batch
from glm4serve.model.kv_cache import KVCache
from glm4serve.model.glm4 import load_model
from glm4serve.model.random_checkpoint import write_random_checkpoint


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_prefill(n: int, chunk: int):
    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(d, variant="glm", layout="hf", hidden_size=128,
                                       intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=16, rope_theta=5e6, max_position_embeddings=131072)
        model = load_model(path, dtype=torch.float32)
    block = 16
    nb = n // block + 1
    kv = KVCache(model.cfg, nb, block, torch.float32)
    for t in kv.k + kv.v:
        t.fill_(0.0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = rss_mib()
    table = list(range(nb))
    ids = torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        b = build_batch([SeqChunk(ids[s : s + chunk], s, table)], block)
        logits = model(b.input_ids, b.positions, b.attn, kv, b.logits_indices)
    dt = time.perf_counter() - t0
    assert torch.isfinite(logits).all()
    peak = rss_mib()
    print(f"prefill {n} tokens in chunks of {chunk}: {dt:.1f} s, {n / dt:.0f} tokens/s")
    print(f"  weights {weights / 2**20:.1f} MiB, KV cache {kv.nbytes / 2**20:.1f} MiB, "
          f"process peak {peak:.0f} MiB (before prefill {base:.0f} MiB, growth {peak - base:.0f} MiB)")
    print(f"  a full fp32 score matrix for one chunk would be {4 * chunk * n * 4 / 2**20:.0f} MiB, "
          f"for the whole prompt {4 * n * n * 4 / 2**30:.0f} GiB")


def bench_decode(batches: list[int], context: int, steps: int):
    from transformers import AutoModelForCausalLM, DynamicCache

    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(d, variant="glm", layout="hf", vocab_size=151552, hidden_size=512,
                                       intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=2,
                                       head_dim=64, rope_theta=5e6)
        ours = load_model(path, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    block = 16
    for bsz in batches:
        g = torch.Generator().manual_seed(bsz)
        prompt = torch.randint(0, 151000, (bsz, context), generator=g)
        # ours: prefill every sequence, then time single-token decode steps for the whole batch
        per_seq = (context + steps) // block + 1
        kv = KVCache(ours.cfg, bsz * per_seq, block, torch.float32)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(bsz)]
        b = build_batch([SeqChunk(prompt[i].tolist(), 0, tables[i]) for i in range(bsz)], block)
        ours(b.input_ids, b.positions, b.attn, kv, b.logits_indices)
        times = []
        for s in range(steps):
            b = build_batch([SeqChunk([int(prompt[i, -1])], context + s, tables[i]) for i in range(bsz)], block)
            t0 = time.perf_counter()
            ours(b.input_ids, b.positions, b.attn, kv, b.logits_indices)
            times.append(time.perf_counter() - t0)
        ours_ms = statistics.median(times) * 1e3
        # transformers: same weights, its own cache, logits of the last position only
        with torch.inference_mode():
            cache = DynamicCache(config=ref.config)
            ref(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times = []
            for s in range(steps):
                t0 = time.perf_counter()
                ref(prompt[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        ref_ms = statistics.median(times) * 1e3
        print(f"decode step, batch {bsz:2d}, context {context}: ours {ours_ms:.1f} ms, "
              f"transformers {ref_ms:.1f} ms, ratio {ref_ms / ours_ms:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill-tokens", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not a.skip_decode:
        bench_decode([1, 32], 128, a.steps)
    if not a.skip_prefill:
        bench_prefill(a.prefill_tokens, a.chunk)


if __name__ == "__main__":
    main()
