"""Decode attention on CPU: decode_attention.c (cpu_attention.py), which reads each sequence's K/V blocks in
place, against PyTorch's way (attention.decode_attention: the blocks gathered into a new tensor, then SDPA), in
one process, taking turns.

By default the attention of one layer at glm-4-9b-chat's heads (32 query heads over 2 KV heads of 128, bf16,
blocks of 16, each sequence's blocks scattered over the cache): one sequence at 512 to 32K tokens of context,
and batches of 4 x 4K, 16 x 1K and 64 x 512 (best ms of --repeats, twice each way). --kv-heads 4 gives
glm-4-9b-chat-1m's heads (groups of 8).

With --engine, the decode step of glm-4-9b-chat's 40 layers (bench_cpu_peers.py's checkpoint, quantized to
--quantization while loading): one forward of --streams sequences, each --contexts tokens into the cache, the
runner called directly, the kernel and PyTorch taking turns (medians of --repeats). The sequences' blocks hold
random K/V written there (a step's time does not depend on the values), so no 16K-token prefill is needed.

    .venv/bin/python benchmarks/bench_decode_attention.py [--repeats 5] [--kv-heads 2]
    .venv/bin/python benchmarks/bench_decode_attention.py --engine [--quantization int4] [--streams 1]
        [--contexts 512,4096,16384,32768] [--repeats 3]

With --kv-fp8 alone, one sequence's decode attention over 40 layers' caches in turn (read from memory, as in a
served model), each --contexts tokens, an fp8 cache against a bf16 one (best ms a layer of --repeats, in turns).
With --engine --kv-fp8, the same step over the model's bf16 cache against an fp8 one (--kv-cache-dtype fp8), both
read by the kernel, taking turns: the runner keeps its weights and swaps caches of the same blocks, the fp8 one
holding the bf16 one's values cast. --chunk N makes the step one sequence's prompt chunk of N tokens that ends at
the context (the AMX chunk kernel's case) instead of decodes.

The kernel runs where the CPU has AVX2 and FMA (cpu_attention.py); --build avx512 takes its fp32 way on a CPU with
AVX-512 BF16 too (as a CPU without BF16 runs it), --build avx2 its AVX2 way on an AVX-512 CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from bench_int8_kernel import turns_best_ms  # noqa: E402 - benchmarks/ is the script's folder
from glm4serve.engine.config import EngineArgs
from glm4serve.model import cpu_attention
from glm4serve.model.attention import decode_attention
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.cpu_linear import hugepage_empty
from glm4serve.model.kv_cache import FP8, KVCache
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine

HEADS, HEAD_DIM, BLOCK = 32, 128, 16
LAYER_CASES = [(1, 512), (1, 2048), (1, 8192), (1, 16384), (1, 32768), (4, 4096), (16, 1024), (64, 512)]


def scattered_blocks(streams: int, context: int, num_blocks: int) -> torch.Tensor:
    """Block tables [streams, context / BLOCK] over a cache of num_blocks, in a shuffled order."""
    per = -(-context // BLOCK)
    return torch.randperm(num_blocks)[: streams * per].view(streams, per).contiguous()


def layer_ab(repeats: int, kv_heads: int):
    print(f"{HEADS} query heads over {kv_heads} KV heads of {HEAD_DIM}, bf16, one layer, best ms of {repeats}:")
    print("| sequences x context | kernel ms | PyTorch ms | speedup |\n|---|---|---|---|")
    for streams, context in LAYER_CASES:
        num_blocks = streams * context // BLOCK + 8
        k = torch.randn(num_blocks, BLOCK, kv_heads, HEAD_DIM).to(torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(streams, HEADS, HEAD_DIM).to(torch.bfloat16)
        tables = scattered_blocks(streams, context, num_blocks)
        lens = torch.full((streams,), context)
        ours, theirs = turns_best_ms(lambda: cpu_attention.decode_attention(q, k, v, tables, lens, HEAD_DIM**-0.5),
                                     lambda: decode_attention(q, k, v, tables, lens, HEAD_DIM**-0.5), repeats)
        print(f"| {streams} x {context} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |", flush=True)


def layers_fp8_ab(repeats: int, contexts: list[int], layers: int = 40):
    print(f"one sequence, {HEADS} query heads over 2 KV heads of {HEAD_DIM}, {layers} layers' caches in turn, "
          f"ms a layer (best of {repeats}, in turns):")
    print("| context | fp8 cache | bf16 cache | speedup |\n|---|---|---|---|")
    for context in contexts:
        num_blocks = context // BLOCK + 4
        caches = {FP8: [], torch.bfloat16: []}
        for _ in range(layers):
            values = torch.randn(2, num_blocks, BLOCK, 2, HEAD_DIM)
            for dtype, held in caches.items():
                pair = [hugepage_empty(tuple(values.shape[1:]), dtype) for _ in "kv"]
                for dst, src in zip(pair, values):
                    dst.view(torch.uint8).copy_(src.to(dtype).view(torch.uint8))
                held.append(pair)
        q = torch.randn(1, HEADS, HEAD_DIM).to(torch.bfloat16)
        tables = scattered_blocks(1, context, num_blocks)
        lens = torch.tensor([context])

        def every_layer(dtype):
            return lambda: [cpu_attention.decode_attention(q, k, v, tables, lens, HEAD_DIM**-0.5)
                            for k, v in caches[dtype]]

        ours, theirs = turns_best_ms(every_layer(FP8), every_layer(torch.bfloat16), repeats)
        print(f"| {context} | {ours / layers:.2f} | {theirs / layers:.2f} | {theirs / ours:.2f}x |", flush=True)


def engine_ab(quantization: str | None, streams: int, contexts: list[int], repeats: int, kv_fp8: bool = False,
              chunk: int = 0):
    from bench_int4_kernel import CHECKPOINT

    if not (CHECKPOINT / "config.json").is_file():
        write_random_checkpoint(CHECKPOINT, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "shards": 10})
    tokens = streams * max(contexts)
    kv_gib = tokens * 40 * 1024 / 2**30 + 0.25
    engine = build_llm_engine(EngineArgs(model=str(CHECKPOINT), dtype="bfloat16", quantization=quantization,
                                         kv_cache_memory=f"{kv_gib:.2f}GiB", max_num_seqs=max(streams, 1),
                                         max_model_len=max(contexts) + 16))
    runner = engine.runner
    for t in runner.kv.k + runner.kv.v:
        t.normal_()
    num_blocks = runner.kv.num_blocks
    caches = {"kernel": runner.kv, "pytorch": runner.kv}
    if kv_fp8:
        fp8 = KVCache(runner.model.cfg, num_blocks, runner.kv.block_size, FP8, zeros=hugepage_empty)
        for dst, src in zip(fp8.k + fp8.v, runner.kv.k + runner.kv.v):
            dst.view(torch.uint8).copy_(src.to(FP8).view(torch.uint8))
        caches = {"kernel": fp8, "pytorch": runner.kv}
    what = f"a {chunk}-token prompt chunk" if chunk else "decode step"
    print(f"\nglm-4-9b-chat's 40 layers, {quantization or 'bf16'}, {streams} stream(s), {what} ms "
          f"(medians of {repeats}):")
    print("| context | fp8 cache | bf16 cache | speedup |\n|---|---|---|---|" if kv_fp8 else
          "| context | kernel | PyTorch | speedup |\n|---|---|---|---|")
    for context in contexts:
        tables = scattered_blocks(streams, context, num_blocks).tolist()
        if chunk:
            batch = ScheduledBatch([SeqChunk([100 + i % 1000 for i in range(chunk)], context - chunk, tables[0])])
        else:
            batch = ScheduledBatch([SeqChunk([100 + i], context - 1, tables[i]) for i in range(streams)])

        def step() -> float:
            t0 = time.perf_counter()
            runner.execute(batch)
            return (time.perf_counter() - t0) * 1000

        times = {"kernel": [], "pytorch": []}
        step()
        for turn in range(repeats):
            for way in ("kernel", "pytorch") if turn % 2 == 0 else ("pytorch", "kernel"):  # either first in turn
                runner.kv = caches[way]
                ours = way == "kernel" or kv_fp8
                with contextlib.nullcontext() if ours else mock.patch.object(cpu_attention, "runs", lambda q, k: False):
                    times[way].append(step())
        ours, theirs = (statistics.median(times[w]) for w in ("kernel", "pytorch"))
        print(f"| {context} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", action="store_true", help="the 40-layer decode step instead of one layer")
    ap.add_argument("--quantization", default="int4", choices=["int4", "int8", "none"])
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--contexts", default="512,4096,16384,32768")
    ap.add_argument("--build", choices=list(cpu_attention.BUILDS), help="by default the fastest this CPU runs")
    ap.add_argument("--kv-heads", type=int, default=2, help="of one layer (2: glm-4-9b-chat's; 4: its 1M variant's)")
    ap.add_argument("--kv-fp8", action="store_true", help="--engine: an fp8 cache against bf16, both in the kernel")
    ap.add_argument("--chunk", type=int, default=0, help="--engine: a prompt chunk of this many tokens, not decodes")
    a = ap.parse_args()
    if cpu_attention._kernel() is None:
        raise SystemExit("decode_attention.c does not run here (no AVX2 and FMA, or no C compiler)")
    here = cpu_attention.builds()
    if a.build and a.build not in here:
        raise SystemExit(f"this CPU does not run the {a.build} build")
    cpu_attention._kernel.cache_clear()
    torch.manual_seed(0)
    with mock.patch.object(cpu_attention, "builds", lambda: [a.build] if a.build else here):
        print(f"decode_attention.c's {cpu_attention.builds()[0]} build")
        if a.engine:
            contexts = [int(c) for c in a.contexts.split(",")]
            engine_ab(None if a.quantization == "none" else a.quantization, a.streams, contexts, a.repeats,
                      a.kv_fp8, a.chunk)
        elif a.kv_fp8:
            layers_fp8_ab(a.repeats, [int(c) for c in a.contexts.split(",")])
        else:
            layer_ab(a.repeats, a.kv_heads)


if __name__ == "__main__":
    main()
