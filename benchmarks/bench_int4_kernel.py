"""Int4Linear's CPU kernels at glm-4-9b-chat's shapes (int8_gemm.c: int4_gemm for a few rows, dequantized bf16
blocks for many), where int8_kernel.py builds. Four parts:

- layers: one decode token's products through `--layers` layers (qkv, o, gate_up, down), each layer its own
  weights so that they come from memory as in a served model, int4 against int8 (the same layers quantized
  to int8, int8_gemm.c's one-row kernel): ms a token and GB/s read; beside them torch's sum over 4 GiB, a
  read at about the memory's own rate.
- rows: int4_gemm against the dequantized-block path by activation rows, each matrix and a layer's four
  (quant.int4_dequantize_min_rows() sits where they cross: it depends on whether the CPU has AMX-BF16), and where
  int4_int8.c builds its int4_int8_gemm (activations int8 per group) against the blocks, best of 3.
- builds: a layer's four products by activation rows (4 to 512), int4_gemm (int16 activations) and each of
  int4_int8.c's builds that runs here (INT4_INT8_BUILDS), taking turns, best of 5; the builds' outputs compared
  bit for bit first.
- engine: decode steps of the int4 engine (engine alone, no server) on the 40-layer checkpoint
  bench_cpu_peers.py makes (~/.cache/glm4serve/bench-slice-9b-40layers; written here, 18.8 GB, when
  missing), 1, 8 and 16 streams (`--streams`), medians; `--int16-batches` keeps int4_int8.c out of it, and
  `--batches int16,vbmi,vnni` runs each stream count's steps in turn on int4_gemm's int16 activations and on the
  named int4_int8.c builds (INT4_INT8_BUILDS: `vnni` is what a CPU with VNNI and no VBMI runs), 3 turns each.

    .venv/bin/python benchmarks/bench_int4_kernel.py [--parts layers,rows,builds,engine] [--layers 40]

On a CPU without AVX-512 (or with GLM4SERVE_MAX_CPU_ISA=avx2, and ATEN_CPU_CAPABILITY=avx2 for torch's kernels)
int4_gemm is quant_avx2.c's: the rows part sets it against torch's int4 kernel (what ran there before), the
layers part has no int8 line, and `--torch-int4` runs the engine part on torch's kernel for the comparison.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model import int8_kernel
from glm4serve.model.cpu_linear import hugepage_copy
from glm4serve.model.cpu_runner import nbytes
from glm4serve.model.quant import Int4Linear, Int8Linear, int4_dequantize_min_rows
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine

from bench_int8_kernel import best_ms  # noqa: E402 - benchmarks/ is the script's folder

LAYER_SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
CHECKPOINT = Path.home() / ".cache" / "glm4serve" / "bench-slice-9b-40layers"  # bench_cpu_peers.py's


def quantized_layers(cls, layers: int) -> dict[str, list]:
    """`layers` copies of each layer linear quantized by cls, their weights in huge pages as the CPU runner
    keeps them (the copies share nothing: each is read from memory)."""
    out = {}
    for name, (n, k) in LAYER_SHAPES.items():
        lin = cls(k, n, False, torch.bfloat16)
        lin.load_weight_rows(0, n, torch.randn(n, k) * 0.02)
        out[name] = []
        for _ in range(layers):
            copy = cls(k, n, False, torch.bfloat16)
            for buffer_name, buffer in lin.named_buffers():
                setattr(copy, buffer_name, hugepage_copy(buffer))
            out[name].append(copy)
    return out


def token_ms(layers: dict[str, list], xs: dict[int, torch.Tensor]) -> dict[str, float]:
    times = dict.fromkeys(layers, 0.0)
    for i in range(len(next(iter(layers.values())))):
        for name, copies in layers.items():
            t0 = time.perf_counter()
            copies[i](xs[copies[i].in_features])
            times[name] += time.perf_counter() - t0
    return {name: t * 1000 for name, t in times.items()}


def bare_read_gbs(gib: int = 4) -> float:
    buf = hugepage_copy(torch.ones(gib << 30, dtype=torch.uint8))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        buf.view(torch.int64).sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() / best / 1e9


def layers_part(layers: int):
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (4096, 13696)}
    read_rate = bare_read_gbs()
    print(f"\none token through {layers} layers' products, medians of 5 (torch's sum over 4 GiB: {read_rate:.1f} GB/s)")
    print("| | qkv | o | gate_up | down | a token |\n|---|---|---|---|---|---|")
    for label, cls in (("int4", Int4Linear), ("int8", Int8Linear))[: 2 if int8_kernel.available() else 1]:
        weights = quantized_layers(cls, layers)
        token_ms(weights, xs)
        runs = [token_ms(weights, xs) for _ in range(5)]
        cells = []
        for name, copies in weights.items():
            ms = statistics.median(r[name] for r in runs)
            cells.append(f"{ms / layers:.3f} ms, {nbytes(copies[0]) * layers / ms / 1e6:.1f} GB/s")
        total = statistics.median(sum(r.values()) for r in runs)
        read = sum(nbytes(c[0]) for c in weights.values()) * layers
        print(f"| {label} | " + " | ".join(cells) + f" | {total:.1f} ms, {read / total / 1e6:.1f} GB/s |", flush=True)
        del weights


def torch_int4(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    """torch's own int4 kernel (bf16 activations), over the scales in its layout: for its time (on a CPU where
    torch packs 32-row tiles, AVX2, it misreads the 64-row ones of pack_int4_tile)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.packed, lin.group, lin.scales_by_row())


def rows_part():
    other = "dequantized bf16 blocks" if int8_kernel.available() else "torch's int4 kernel"
    int8 = int8_kernel.available() and int8_kernel._int4_int8_kernel() is not None  # int4_int8.c builds here
    extra = " int4_int8_gemm | blocks / int4_int8_gemm |" if int8 else ""
    print(f"\nint4_gemm against {other}, best of 3 ms\n| matrix | rows | int4_gemm | {other} | ratio |{extra}")
    print("|---|---|---|---|---|" + "---|---|" * int8)
    layer: dict[int, list[float]] = {}  # rows -> the four products' ms, each way
    for name, (n, k) in LAYER_SHAPES.items():
        lin = Int4Linear(k, n, False, torch.bfloat16)
        lin.load_weight_rows(0, n, torch.randn(n, k))
        p, sz = hugepage_copy(lin.packed), hugepage_copy(lin.scales_and_zeros)
        for rows in (1, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 512):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            times = [best_ms(lambda: int8_kernel.int4_gemm(x, p, sz, lin.group), 3),
                     best_ms((lambda: int8_kernel.int4_matmul(x, p, sz, lin.group)) if int8_kernel.available()
                             else (lambda: torch_int4(x, lin)), 3)]
            if int8:
                times.append(best_ms(lambda: int8_kernel.int4_int8_gemm(x, p, sz, lin.group), 3))
            print(f"| {name} {n}x{k} | {rows} | " + cells(times), flush=True)
            both = layer.setdefault(rows, [0.0] * len(times))
            for i, t in enumerate(times):
                both[i] += t
    for rows, times in layer.items():
        print(f"| a layer's four | {rows} | " + cells(times))
    if int8_kernel.available():
        print(f"(this CPU takes the blocks from {int4_dequantize_min_rows()} rows"
              + (f", int4_int8_gemm from {int8_kernel.int4_int8_min_rows()} before them)" if int8 else ")"))


def builds_part():
    builds = {isa: lib for isa in int8_kernel.INT4_INT8_BUILDS if (lib := int8_kernel.int4_int8_library(isa))}
    if not builds:
        print("\nno int4_int8.c build runs here")
        return
    first, *others = builds
    print("\na layer's four products, int4_gemm (int16 activations) and int4_int8.c's builds, best of 5 ms\n"
          "| rows | int4_gemm | " + " | ".join(builds) + " | " + "".join(f"{b} / {first} | " for b in others)
          + " | ".join(f"int4_gemm / {b}" for b in builds) + " |")
    print("|---|---|" + "---|" * (3 * len(builds) - 1))
    mats = []
    for n, k in LAYER_SHAPES.values():
        lin = Int4Linear(k, n, False, torch.bfloat16)
        lin.load_weight_rows(0, n, torch.randn(n, k))
        mats.append((hugepage_copy(lin.packed), hugepage_copy(lin.scales_and_zeros), lin.group, k))
    for rows in (4, 8, 16, 32, 64, 128, 256, 512):
        xs = [torch.randn(rows, k) for *_, k in mats]
        runs = {"int4_gemm": lambda x, p, sz, g: int8_kernel.int4_gemm(x, p, sz, g)}
        runs |= {isa: lambda x, p, sz, g, lib=lib: int8_kernel.int4_int8_gemm(x, p, sz, g, lib)
                 for isa, lib in builds.items()}
        for x, (p, sz, g, _) in zip(xs, mats):
            want = runs[first](x, p, sz, g)
            assert all(torch.equal(runs[isa](x, p, sz, g), want) for isa in builds), "the builds differ"
        best = {name: [float("inf")] * len(mats) for name in runs}
        for _ in range(5):
            for name, run in runs.items():
                for i, (x, (p, sz, g, _)) in enumerate(zip(xs, mats)):
                    t0 = time.perf_counter()
                    run(x, p, sz, g)
                    best[name][i] = min(best[name][i], (time.perf_counter() - t0) * 1000)
        ms = {name: sum(times) for name, times in best.items()}
        print(f"| {rows} | " + " | ".join(f"{t:.1f}" for t in ms.values()) + " | "
              + "".join(f"{ms[b] / ms[first]:.2f}x | " for b in others)
              + " | ".join(f"{ms['int4_gemm'] / ms[b]:.2f}x" for b in builds) + " |", flush=True)


def cells(times: list[float]) -> str:
    """int4_gemm's ms, the other's, their ratio, and (with three) int4_int8_gemm's and the other's over it"""
    out = f"{times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.2f}x |"
    return out + (f" {times[2]:.2f} | {times[1] / times[2]:.2f}x |" if len(times) > 2 else "")


PROMPTS = itertools.count()  # a first token each, below the checkpoint's tokenizer's 2270


def take_batches(kernel: str):
    """int4 batches from here on in int4_gemm's int16 activations ("int16") or int4_int8.c's build `kernel`."""
    lib = None if kernel == "int16" else int8_kernel.int4_int8_library(kernel)
    if kernel != "int16" and lib is None:
        raise SystemExit(f"int4_int8.c's {kernel} build does not run here")
    rows = (1 << 30 if lib is None else int8_kernel.INT4_INT8_AVX2_MIN_ROWS if kernel == "avx2"
            else int8_kernel.INT4_INT8_MIN_ROWS)
    int8_kernel.int4_int8_min_rows = lambda: rows
    int8_kernel._int4_int8_kernel = lambda: lib


def engine_part(stream_counts: list[int], batches: list[str]):
    if not (CHECKPOINT / "config.json").is_file():
        write_random_checkpoint(CHECKPOINT, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": 40, "shards": 10})
    engine = build_llm_engine(EngineArgs(model=str(CHECKPOINT), dtype="bfloat16", quantization="int4",
                                         kv_cache_memory="1GiB", max_num_seqs=32))
    print("\nthe int4 engine, glm-4-9b-chat's 40 layers (random weights), decode steps (median)")
    for streams in stream_counts:
        if not batches:
            ms = statistics.median(decode_steps(engine, streams, f"{streams}"))
            print(f"  {streams} streams: {ms:.1f} ms a step, {streams * 1000 / ms:.1f} tokens/s", flush=True)
            continue
        steps: dict[str, list[float]] = {kernel: [] for kernel in batches}
        for turn in range(3):
            for kernel in batches:
                take_batches(kernel)
                steps[kernel] += decode_steps(engine, streams, f"{streams}-{kernel}-{turn}")
        ms = {kernel: statistics.median(times) for kernel, times in steps.items()}
        print(f"  {streams} streams: " + ", ".join(
            f"{kernel} {t:.1f} ms a step ({streams * 1000 / t:.1f} tokens/s, {ms[batches[0]] / t:.2f}x {batches[0]})"
            for kernel, t in ms.items()), flush=True)


def decode_steps(engine, streams: int, name: str) -> list[float]:
    """`streams` requests of 64 prompt tokens (each its own, so no prefix is cached) run to 14 tokens: the ms of
    each decode step after the first."""
    for i in range(streams):
        engine.add_request(f"{name}-{i}", [200 + next(PROMPTS) % 2000, *range(101 + i, 164 + i)],
                           SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True))
    while engine.scheduler.num_requests > len(engine.scheduler.running) or any(
            s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()  # the first decode step
    times = []
    while engine.has_work:
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="layers,rows,builds,engine")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--streams", default="1,8,16", help="the engine part's numbers of streams")
    ap.add_argument("--torch-int4", action="store_true", help="the engine on torch's int4 kernel, none of ours")
    ap.add_argument("--int16-batches", action="store_true",
                    help="int4 batches with int16 activations, not int4_int8.c's int8 ones (to compare)")
    ap.add_argument("--batches", default="",
                    help="the engine part's int4 batches in turn on these: int16 and int4_int8.c's builds")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.torch_int4:
        int8_kernel._library = int8_kernel.avx2_library = lambda: None
    elif a.int16_batches:
        int8_kernel.int4_int8_min_rows = lambda: 1 << 30
    if not a.torch_int4 and not int8_kernel.kernels_available():
        raise SystemExit("int8_kernel's int4_gemm is not available here (no AVX2 or no C compiler)")
    parts = a.parts.split(",")
    if "layers" in parts:
        layers_part(a.layers)
    if "rows" in parts:
        rows_part()
    if "builds" in parts:
        builds_part()
    if "engine" in parts:
        engine_part([int(n) for n in a.streams.split(",")], [b for b in a.batches.split(",") if b])


if __name__ == "__main__":
    main()
