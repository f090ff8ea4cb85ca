"""Prefill of one long prompt through the engine on a slice of glm-4-9b-chat (its exact layer shapes,
--layers of its 40 layers, random bf16 weights), CPU: seconds per prompt and where they go (the
linears, attention, the rest), against transformers' forward (SDPA attention, the last position's
logits only) on the same weights in the same run. With --ab, our prefill as served against the
same engine with one thing switched off, taking turns:
- query-tile: attention's query tiles as large as the score budget allows (not QUERY_TILE);
- compiled-rows: the norms and SwiGLU eager on any number of rows (cpu_runner.COMPILED_ROWS_MIN);
- span-kernel: prompt chunks attend in PyTorch's query tiles, not decode_attention.c (cpu_attention.takes_span);
- chunk-kernel: on a CPU with AMX-BF16, bf16 chunks without the AMX build's chunk kernel (cpu_attention.chunk_takes):
  PyTorch's query tiles, as the rule before it had them;
- int8-tiles: on a CPU with AMX-BF16, int8 products of many rows through dequantized bf16 blocks and oneDNN, not
  dequantized_tiles.h's int8_tiles_gemm (int8_kernel.tiles_fit);
- int4-tiles: the same for int4 (int8_kernel.int4_tiles_fit): int4_amx_gemm up to 160 rows, then the bf16 blocks.
With --scoring, each turn also scores a prompt of that length (prompt_logprobs=1: the logprob of every
prompt token, as an evaluation harness asks for it), and transformers' turn scores it too (all positions'
logits, log-softmax, the prompt tokens' logprobs).

    .venv/bin/python benchmarks/bench_prefill.py [--layers 2] [--tokens 2048,8192,16384]
        [--modes bf16,int8,int4] [--repeats 2]
        [--ab query-tile|compiled-rows|span-kernel|chunk-kernel|int8-tiles|int4-tiles]
        [--scoring] [--skip-hf] [--threshold 0]

The engine runs with its default chunk (max_num_batched_tokens; --threshold caps it) and no prefix cache; each turn's
prompt differs from the first token on. Times are medians of --repeats turns.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model import attention, cpu_attention, cpu_runner, glm4, int8_kernel, quant
from glm4serve.model.cpu_linear import CpuLinear
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine

CACHE = Path.home() / ".cache" / "glm4serve"
VOCAB = 2000  # ids the random checkpoint's small tokenizer accepts
QUANTIZATION = {"bf16": None, "int8": "int8", "int4": "int4"}
SWITCHED_OFF = {"query-tile": (attention, "QUERY_TILE", 1 << 30),
                "compiled-rows": (cpu_runner, "COMPILED_ROWS_MIN", 1 << 30),
                "span-kernel": (cpu_attention, "takes_span", lambda n, q, k_cache: False),
                "chunk-kernel": (cpu_attention, "chunk_takes", lambda n, q, k_cache: False),
                "int8-tiles": (int8_kernel, "tiles_fit", lambda m, n, k: False),
                "int4-tiles": (int8_kernel, "int4_tiles_fit", lambda m, n, k, group: False)}  # module, name, value
SPENT: collections.Counter = collections.Counter()  # seconds by part, for the turn being timed


def timed(part: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[part] += time.perf_counter() - t0
    return wrapper


def count_time_by_part() -> None:
    """The linears' and attention's time into SPENT (glm4.py calls paged_attention by its own name)."""
    glm4.paged_attention = timed("attention", glm4.paged_attention)
    for cls in (CpuLinear, quant.Int8Linear, quant.Int4Linear):
        cls.forward = timed("linears", cls.forward)


def prompt(n: int, turn: int) -> list[int]:
    """Token ids inside the test tokenizer's vocabulary, a different one first each turn."""
    return [(turn + 1 + 7 * i) % VOCAB for i in range(n)]


def ours_s(engine, ids: list[int], prompt_logprobs: int | None = None) -> float:
    engine.add_request(f"p{time.perf_counter_ns()}", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                                          prompt_logprobs=prompt_logprobs))
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - t0


def hf_s(model, ids: list[int], scoring: bool = False) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(torch.tensor([ids]), use_cache=False, logits_to_keep=0 if scoring else 1).logits
        if scoring:
            logits[0, :-1].float().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
        return time.perf_counter() - t0


def slice_checkpoint(layers: int) -> Path:
    """The slice of glm-4-9b-chat's first `layers` layers (random bf16 weights), written once into CACHE."""
    path = CACHE / f"bench-prefill-9b-{layers}layers"
    if not (path / "config.json").is_file():
        write_random_checkpoint(path, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": layers})
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="2048,8192,16384")
    ap.add_argument("--modes", default="bf16,int8,int4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ab", choices=sorted(SWITCHED_OFF))
    ap.add_argument("--scoring", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threshold", type=int, default=0, help="long_prefill_token_threshold: chunks of at most this")
    a = ap.parse_args()
    lengths = [int(t) for t in a.tokens.split(",")]
    path = slice_checkpoint(a.layers)
    count_time_by_part()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.layers}-layer slice of glm-4-9b-chat; "
          f"medians of {a.repeats} turns")
    for mode in a.modes.split(","):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="bfloat16", quantization=QUANTIZATION[mode],
                                             kv_cache_memory="1GiB", enable_prefix_caching=False,
                                             long_prefill_token_threshold=a.threshold))
        ours_s(engine, prompt(256, -1))  # warm-up
        for n in lengths:
            times, parts = [], collections.Counter()
            other, scored = [], []
            for turn in range(a.repeats):
                SPENT.clear()
                times.append(ours_s(engine, prompt(n, turn)))
                parts.update(SPENT)
                if a.scoring:
                    scored.append(ours_s(engine, prompt(n, turn + 200), prompt_logprobs=1))
                if a.ab:
                    module, name, value = SWITCHED_OFF[a.ab]
                    served = getattr(module, name)
                    setattr(module, name, value)
                    other.append(ours_s(engine, prompt(n, turn + 100)))
                    setattr(module, name, served)
            t = statistics.median(times)
            att, lin = parts["attention"] / a.repeats, parts["linears"] / a.repeats
            line = (f"{mode} {n:6d} tokens: ours {t:6.2f} s ({n / t:5.0f} tokens/s; linears {lin:.2f} s, "
                    f"attention {att:.2f} s, the rest {statistics.mean(times) - lin - att:.2f} s)")
            if other:
                o = statistics.median(other)
                line += f"; without {a.ab} {o:.2f} s, {o / t:.2f}x"
            if scored:
                sc = statistics.median(scored)
                line += f"; scored {sc:.2f} s, {sc / t:.2f}x the prefill's time"
            print(line, flush=True)
        del engine
    if a.skip_hf:
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hf_s(model, prompt(256, -1))
    for n in lengths:
        t = statistics.median(hf_s(model, prompt(n, turn)) for turn in range(a.repeats))
        line = f"transformers bf16 {n:6d} tokens: {t:6.2f} s ({n / t:5.0f} tokens/s)"
        if a.scoring:
            sc = statistics.median(hf_s(model, prompt(n, turn), True) for turn in range(a.repeats))
            line += f"; scored {sc:.2f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
