"""bf16 linears at glm-4-9b-chat's shapes, in one process, taking turns: as served where bf16_kernel.py
builds (the weight plain: up to bf16_kernel.max_rows(weight) rows in bf16_gemm.c, 128 on AMX tiles, else 48, more
through oneDNN over the plain weight) against the weight packed by oneDNN for every product (as served
without the kernel); best of --repeats, for --rows rows.

With --engine instead, two engines on a 9B slice (exact layer shapes, --layers of them, full vocabulary),
one built each way, taking turns: decode steps at 1, 4 and 32 streams, and the prefill of a 1,024-token
prompt. With --batches (or its older name --tiles), one engine on glm-4-9b-chat's 40 layers
(bench_cpu_peers.py's checkpoint, 18.8 GB, one copy of which fits a 24 GB box), its products of
5-bf16_kernel.max_rows rows taking turns between bf16_gemm.c (AMX tiles for 5-128 rows where the CPU has
AMX-BF16, else the vector kernel up to 48) and oneDNN over the plain weight (1-4 rows in the vector kernel in both).

    .venv/bin/python benchmarks/bench_bf16_kernel.py [--repeats 5] [--rows 1,2,4,8,32,512]
        [--engine [--layers 2]] [--batches]

On a CPU with AVX2 and not AVX-512 BF16 (or with GLM4SERVE_MAX_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2), "served" is bf16_gemm_avx2 for every product and the other way torch's F.linear over
the plain weight, since oneDNN multiplies no bf16 there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from unittest import mock

import torch
from torch import nn

from bench_int8_kernel import SHAPES, decode_ms, turns_best_ms
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model import bf16_kernel, cpu_linear
from glm4serve.model.cpu_linear import CpuLinear
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine


def without_kernel() -> str:
    """What a bf16 product runs in when bf16_gemm.c does not take it."""
    return "packed oneDNN" if cpu_linear.onednn_takes(torch.bfloat16) else "torch's F.linear"


def products(rows_list: list[int], repeats: int):
    print(f"| matrix | rows | served ms | {without_kernel()} ms | speedup |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        served, packed = CpuLinear(lin, plain=False), CpuLinear(lin, plain=False, bf16_kernel_rows=0)
        del lin
        for rows in rows_list:
            if name == "output layer" and rows > 32:
                continue  # a prefill multiplies only its last row by the output layer
            x = torch.randn(rows, k).to(torch.bfloat16)
            ours, theirs = turns_best_ms(lambda: served(x), lambda: packed(x), repeats)
            print(f"| {name} {n}x{k} | {rows} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |", flush=True)


def prefill_ms(engine, prompt_len: int, lora: str | None = None) -> float:
    """One prompt new to the prefix cache, to its first token (with the LoRA adapter `lora`, if any)."""
    prompt = [100 + (i * 7 + time.perf_counter_ns()) % 2000 for i in range(prompt_len)]
    engine.add_request(f"p{time.perf_counter_ns()}", prompt, SamplingParams(max_tokens=1, temperature=0.0, lora=lora))
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    return (time.perf_counter() - t0) * 1000


def engine_ab(layers: int, repeats: int):
    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(d, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": layers})
        args = EngineArgs(model=str(path), dtype="bfloat16", kv_cache_memory="1GiB", max_num_seqs=32)
        engines = {"kernel": build_llm_engine(args)}
        with mock.patch.object(bf16_kernel, "kernel_rows", lambda weight: 0):
            engines["packed"] = build_llm_engine(args)
        print(f"\n{layers}-layer 9B slice, bf16 (medians of {repeats}):")
        for what, run in ((f"decode step, {s} streams", lambda e, s=s: decode_ms(e, s, 16)) for s in (1, 4, 32)):
            report(what, engines, run, repeats)
        report("prefill of 1,024 tokens", engines, lambda e: prefill_ms(e, 1024), repeats)


def batches_ab(repeats: int):
    from bench_int4_kernel import CHECKPOINT

    if not (CHECKPOINT / "config.json").is_file():
        write_random_checkpoint(CHECKPOINT, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "shards": 10})
    engine = build_llm_engine(EngineArgs(model=str(CHECKPOINT), dtype="bfloat16", kv_cache_memory="2GiB",
                                         max_num_seqs=32))
    linears = [m for m in engine.runner.model.modules() if isinstance(m, CpuLinear)]

    def with_rows(rows: int, f):  # the products of up to `rows` rows in bf16_gemm.c, more through oneDNN
        for layer in linears:
            layer.kernel_rows = rows
        return f(engine)

    most = linears[0].kernel_rows  # every 9B weight's (its rows are a multiple of 32, for the tiles)
    ways = {"kernel": most, "packed": bf16_kernel.VECTOR_ROWS}
    kernel = "AMX tiles" if bf16_kernel.amx_available() else "the vector kernel"
    print(f"\nglm-4-9b-chat's 40 layers, bf16 (medians of {repeats}); 'with the kernel' = {kernel} for 5-{most} rows, "
          "'packed oneDNN' = oneDNN over the plain weight there:")
    for streams in (4, 8, 16, 32):
        report(f"decode step, {streams} streams", ways,
               lambda rows, s=streams: with_rows(rows, lambda e: decode_ms(e, s, 8)), repeats)
    prompt = min(most, 128)
    report(f"prefill of {prompt} tokens", ways, lambda rows: with_rows(rows, lambda e: prefill_ms(e, prompt)), repeats)


def report(what: str, engines: dict, run, repeats: int):
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(run(engine))
    ours, packed = (statistics.median(times[n]) for n in ("kernel", "packed"))
    print(f"  {what}: with the kernel {ours:.1f} ms, {without_kernel()} {packed:.1f} ms, {packed / ours:.2f}x",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default="1,2,4,8,32,512")
    ap.add_argument("--engine", action="store_true", help="the engine's steps on a 9B slice instead")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", "--tiles", action="store_true",
                    help="bf16_gemm.c's batches against oneDNN in one 40-layer engine")
    a = ap.parse_args()
    if not (bf16_kernel.available() or bf16_kernel.avx2_available()):
        raise SystemExit("bf16_gemm.c is not built here (no AVX-512 BF16 or AVX2, or no C compiler)")
    torch.manual_seed(0)
    if a.batches:
        if not bf16_kernel.available():
            raise SystemExit("no AVX-512 BF16 here")
        batches_ab(a.repeats)
    elif a.engine:
        engine_ab(a.layers, a.repeats)
    else:
        products([int(r) for r in a.rows.split(",")], a.repeats)


if __name__ == "__main__":
    main()
