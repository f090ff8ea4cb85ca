"""Int8Linear at glm-4-9b-chat's shapes, in one process, taking turns: as served where int8_kernel.py
builds (int16 activations: one row on AVX-512 VNNI, batches on AMX tiles where the CPU has them, many
rows as bf16-dequantized weights through oneDNN; on a CPU with AVX2 and not AVX-512 -- or with
GLM4SERVE_MAX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 -- every row count in quant_avx2.c) against torch's
`_weight_int8pack_mm` (bf16 activations) alone; best of --repeats, for --rows rows of bf16 activations,
and each one's error against a float64 product (fp32 activations in and out). With --amx-sweep instead,
the AMX kernel against the paths it replaces, by rows. With --scratch-ab instead, the bf16-block path
(rows >= AMX_MAX_ROWS) with its kept scratch buffer against a fresh buffer per call. With --engine
instead, decode steps of the int8 engine on a 9B slice (exact layer shapes, --layers of them, full
vocabulary; or --checkpoint), one process, the two taking turns: 1 and 32 streams (--streams).

    .venv/bin/python benchmarks/bench_int8_kernel.py [--repeats 5] [--rows 1,32,512] [--amx-sweep]
        [--scratch-ab --rows 192,512,2048] [--engine [--layers 2 | --checkpoint DIR] [--streams 1,32]]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model import int8_kernel
from glm4serve.model.quant import Int8Linear
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine

SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696),
          "output layer": (151552, 4096)}


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def turns_best_ms(a, b, repeats: int) -> tuple[float, float]:
    """Best ms of a() and of b(), the two taking turns twice (a, b, a, b)."""
    times_a, times_b = [], []
    for _ in range(2):
        times_a.append(best_ms(a, repeats))
        times_b.append(best_ms(b, repeats))
    return min(times_a), min(times_b)


def decode_ms(engine, streams: int, tokens: int, loras: list[str | None] | None = None) -> float:
    """Mean step time once every stream decodes (prompts of 64 tokens, greedy, `tokens` new; stream i
    with the LoRA adapter loras[i] when given)."""
    for i in range(streams):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, lora=loras[i] if loras else None)
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", list(range(100 + i, 164 + i)), params)
    while engine.scheduler.num_requests > len(engine.scheduler.running) or any(
            s.is_prefilling for s in engine.scheduler.running):
        engine.step()
    t0, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) / steps * 1000


def engine_ab(layers: int, repeats: int, checkpoint: str | None, streams_list: list[int]):
    ours = int8_kernel.kernels_available
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint or write_random_checkpoint(d, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": layers})
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="bfloat16", quantization="int8",
                                             kv_cache_memory="1GiB", max_num_seqs=32))
        layers = len(engine.runner.model.layers)
        print(f"\n{layers}-layer 9B slice, int8 ({int8_kernel.kernels()} against torch's int8pack), decode step ms "
              f"(median of {repeats}):")
        for streams in streams_list:
            tokens = 24 if streams == 1 else 8
            times = {True: [], False: []}
            for _ in range(repeats):
                for use_kernel in (True, False):
                    int8_kernel.kernels_available = ours if use_kernel else (lambda: False)
                    times[use_kernel].append(decode_ms(engine, streams, tokens))
            int8_kernel.kernels_available = ours
            mine, torchs = statistics.median(times[True]), statistics.median(times[False])
            print(f"  {streams} streams: ours {mine:.1f} ms, torch int8pack {torchs:.1f} ms, {torchs / mine:.2f}x",
                  flush=True)


def amx_sweep(rows_list: list[int], repeats: int):
    """int8_amx_matmul against what serves the same rows without AMX (the VNNI kernel below
    DEQUANTIZE_MIN_ROWS, bf16 blocks from there), taking turns; the rows are bf16."""
    fits = int8_kernel.amx_fits
    print("| matrix | rows | AMX ms | without AMX ms | speedup |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = (torch.rand(n) / 100).to(torch.bfloat16)
        for rows in rows_list:
            x = torch.randn(rows, k).to(torch.bfloat16)

            def run(amx: bool):
                int8_kernel.amx_fits = (lambda m, n_, k_: 2 <= m) if amx else (lambda *_: False)
                return int8_kernel.matmul(x, w, scale)

            amx, other = turns_best_ms(lambda: run(True), lambda: run(False), repeats)
            int8_kernel.amx_fits = fits
            print(f"| {name} {n}x{k} | {rows} | {amx:.2f} | {other:.2f} | {other / amx:.2f}x |", flush=True)


def scratch_ab(rows_list: list[int], repeats: int):
    """int8_kernel.matmul on the bf16-block path, its scratch buffer kept (as served) against one
    allocated per call, taking turns."""
    kept = int8_kernel._scratch_bf16
    fresh = lambda numel: torch.empty(numel, dtype=torch.bfloat16)  # noqa: E731
    print("| matrix | rows | kept buffer ms | fresh buffer ms | speedup |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        if name == "output layer":
            continue  # its rows are one per sequence, not a prefill's tokens
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = (torch.rand(n) / 100).to(torch.bfloat16)
        for rows in rows_list:
            x = torch.randn(rows, k).to(torch.bfloat16)

            def run(scratch):
                int8_kernel._scratch_bf16 = scratch
                return int8_kernel.matmul(x, w, scale)

            ours, other = turns_best_ms(lambda: run(kept), lambda: run(fresh), repeats)
            int8_kernel._scratch_bf16 = kept
            print(f"| {name} {n}x{k} | {rows} | {ours:.2f} | {other:.2f} | {other / ours:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", action="store_true", help="the engine's decode steps on a 9B slice instead")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--checkpoint", help="--engine on this checkpoint instead of a --layers slice written for it")
    ap.add_argument("--streams", default="1,32", help="--engine's numbers of streams")
    ap.add_argument("--rows", default="1,32,512", help="activation rows, comma-separated")
    ap.add_argument("--amx-sweep", action="store_true",
                    help="instead: the AMX kernel against the paths it replaces (VNNI or bf16 blocks), by rows")
    ap.add_argument("--scratch-ab", action="store_true",
                    help="instead: bf16 blocks with the kept scratch buffer against a fresh one per call")
    a = ap.parse_args()
    rows_list = [int(r) for r in a.rows.split(",")]
    torch.set_num_threads(2)
    if not int8_kernel.kernels_available():
        raise SystemExit("int8_kernel is not available here (no AVX2 or no C compiler)")
    if (a.amx_sweep or a.scratch_ab) and not int8_kernel.available():
        raise SystemExit("--amx-sweep and --scratch-ab need int8_gemm.c (AVX-512 VNNI)")
    if a.engine:
        engine_ab(a.layers, 3, a.checkpoint, [int(n) for n in a.streams.split(",")])
        return
    if a.amx_sweep:
        amx_sweep(rows_list, a.repeats)
        return
    if a.scratch_ab:
        scratch_ab([r for r in rows_list if r >= int8_kernel.AMX_MAX_ROWS], a.repeats)
        return
    ours = int8_kernel.kernels_available
    print(f"int8 products in {int8_kernel.kernels()}")
    print("| matrix | rows | ours ms | torch int8pack ms | speedup | error: ours / int8pack |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        lin = Int8Linear(k, n, False, torch.bfloat16)
        lin.load_weight_rows(0, n, torch.randn(n, k))
        truth_w = lin.dequantized().double()
        for rows in rows_list:
            x = torch.randn(rows, k).to(torch.bfloat16)
            x32 = x.float()  # the error with fp32 in and out: the kernels' own, not the output's rounding
            truth = x32.double() @ truth_w.T
            times = {True: [], False: []}
            errors = {}
            for use_kernel in (True, False, True, False):
                int8_kernel.kernels_available = ours if use_kernel else (lambda: False)
                times[use_kernel].append(best_ms(lambda: lin(x), a.repeats))
                errors[use_kernel] = ((lin(x32).double() - truth).abs().max() / truth.abs().max()).item()
            int8_kernel.kernels_available = ours
            mine, torchs = min(times[True]), min(times[False])
            print(f"| {name} {n}x{k} | {rows} | {mine:.2f} | {torchs:.2f} | {torchs / mine:.2f}x | "
                  f"{errors[True]:.1e} / {errors[False]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
