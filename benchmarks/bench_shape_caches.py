"""Resident memory of oneDNN's and ideep's caches of compiled products (model/cpu_linear.py,
limit_onednn_caches) on a slice of glm-4-9b-chat (its exact layer shapes, random bf16 weights), CPU.

A server's prefill chunks come in every length, and each length gives the chunk's products shapes of
their own. This sends prompts of distinct lengths, one at a time, through the engine, and reads the
resident memory every --every prompts, after handing the C heap's free pages back (as the idle server
does). Run it once as it is and once with oneDNN's own defaults (1,024 shapes each), and compare:

    .venv/bin/python benchmarks/bench_shape_caches.py [--prompts 160] [--layers 2] [--quantization int8]
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024 .venv/bin/python benchmarks/bench_shape_caches.py

(The server sets both to model/cpu_linear.ONEDNN_CACHED_SHAPES unless the environment does.)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from glm4serve.engine.async_engine import release_free_memory
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from bench_prefill import VOCAB, slice_checkpoint  # noqa: E402 - benchmarks/ is the script's folder
from glm4serve.server import build_llm_engine



def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prefill_s(engine, n: int, turn: int) -> float:
    ids = [(turn + 1 + 7 * i) % VOCAB for i in range(n)]  # a different first token each turn
    engine.add_request(f"p{turn}", ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quantization", choices=["none", "int8", "int4"], default="int8")
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--lengths", default="192,1000", help="prompt lengths drawn without repeats from [lo, hi)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path = slice_checkpoint(a.layers)
    engine = build_llm_engine(EngineArgs(
        model=str(path), dtype="bfloat16", quantization=None if a.quantization == "none" else a.quantization,
        kv_cache_memory="256MiB", enable_prefix_caching=False))
    caps = {k: os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    print(f"{a.layers}-layer slice of glm-4-9b-chat, {a.quantization}; cache capacities {caps}")
    lo, hi = (int(x) for x in a.lengths.split(","))
    lengths = random.Random(a.seed).sample(range(lo, hi), a.prompts)
    prefill_s(engine, 64, -1)  # warm-up
    release_free_memory()
    start = rss_mib()
    times, samples = [], []
    for turn, n in enumerate(lengths):
        times.append(prefill_s(engine, n, turn) / n * 1000)
        if (turn + 1) % a.every == 0:
            release_free_memory()
            samples.append(rss_mib())
    print(f"RSS MiB after the warm-up {start:.0f}; after every {a.every} prompts: "
          + ", ".join(f"{m:.0f}" for m in samples))
    print(f"rise {samples[-1] - start:.0f} MiB over {a.prompts} prompt lengths; prefill median "
          f"{statistics.median(times):.3f} ms/token (first half {statistics.median(times[: a.prompts // 2]):.3f}, "
          f"second half {statistics.median(times[a.prompts // 2 :]):.3f})")


if __name__ == "__main__":
    main()
