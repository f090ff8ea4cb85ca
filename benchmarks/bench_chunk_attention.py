"""A prompt chunk's attention in one layer on a CPU with AMX-BF16: the AMX build's chunk kernel
(chunk_attention_amx.h) against PyTorch's way (the context gathered, SDPA in query tiles) and, for short spans,
the decode kernel's AMX build (its own tiles for each query). bf16, glm-4-9b's heads (32 over 2 KV heads of 128;
--kv-heads 4: the 1M variant's), the sequence's blocks scattered over the cache; ms a call, medians of --repeats,
the ways taking turns, each against one attention in float64 (max error).

    .venv/bin/python benchmarks/bench_chunk_attention.py [--repeats 5] [--kv-heads 2]
        [--cases 0:2048,2048:2048,...]  (cached tokens before the chunk : the chunk's queries)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glm4serve.model import attention, cpu_attention
from glm4serve.model.attention import PrefillSpan

CASES = ("0:2048,2048:2048,6144:2048,14336:2048,30720:2048,8192:512,4096:256,16384:256,"
         "512:16,4096:16,16384:16,512:32,4096:32,16384:32,512:64,4096:64,16384:64")
BLOCK = 16


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, ctx: int,
              scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = k_cache[table].reshape(-1, hkv, d)[:ctx].double().transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)
    v = v_cache[table].reshape(-1, hkv, d)[:ctx].double().transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)
    mask = torch.arange(ctx)[None] <= torch.arange(ctx - n, ctx)[:, None]  # [n, ctx]
    return F.scaled_dot_product_attention(q.double().transpose(0, 1)[None], k, v, attn_mask=mask,
                                          scale=scale)[0].transpose(0, 1)


def pytorch_way(q, k_cache, v_cache, span, scale):
    takes = cpu_attention.takes_span
    cpu_attention.takes_span = lambda n, q, k_cache: False
    try:
        return attention.prefill_attention(q, k_cache, v_cache, span, scale)
    finally:
        cpu_attention.takes_span = takes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--cases", default=CASES)
    args = ap.parse_args()
    hq, hkv, d, scale = 32, args.kv_heads, 128, 128**-0.5
    torch.manual_seed(0)
    print(f"builds {cpu_attention.builds()}, {torch.get_num_threads()} threads, heads {hq} over {hkv} x {d}, bf16")
    probe = torch.empty(1, hq, d, dtype=torch.bfloat16)
    if not cpu_attention.chunk_takes(2048, probe, torch.empty(1, BLOCK, hkv, d, dtype=torch.bfloat16)):
        raise SystemExit("the chunk kernel does not run here (an AMX build on a CPU with AMX-BF16)")
    print("| cached tokens | queries | chunk kernel | PyTorch | decode kernel (amx) | chunk vs PyTorch "
          "| chunk vs decode kernel | max error: chunk / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        past, n = map(int, case.split(":"))
        ctx = past + n
        blocks = -(-ctx // BLOCK)
        k_cache = torch.randn(blocks + 8, BLOCK, hkv, d, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(blocks + 8)[:blocks]
        q = torch.randn(n, hq, d, dtype=torch.bfloat16)
        span = PrefillSpan(0, n, ctx, table)
        ways = {"chunk": lambda: cpu_attention.chunk_attention(q, k_cache, v_cache, table, ctx, scale),
                "pytorch": lambda: pytorch_way(q, k_cache, v_cache, span, scale)}
        if n <= cpu_attention.MAX_SPAN_QUERIES:
            ways["decode"] = lambda: cpu_attention.span_attention(q, k_cache, v_cache, table, ctx, scale,
                                                                  build="amx")
        truth = reference(q, k_cache, v_cache, table, ctx, scale)
        errors = {name: (way().double() - truth).abs().max().item() for name, way in ways.items()}
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                t0 = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - t0)
        ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        decode = f"{ms['decode']:.2f}" if "decode" in ms else ""
        vs_decode = f"{ms['decode'] / ms['chunk']:.2f}x" if "decode" in ms else ""
        print(f"| {past:,} | {n:,} | {ms['chunk']:.2f} | {ms['pytorch']:.2f} | {decode} | "
              f"{ms['pytorch'] / ms['chunk']:.2f}x | {vs_decode} | {errors['chunk']:.1e} / {errors['pytorch']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
