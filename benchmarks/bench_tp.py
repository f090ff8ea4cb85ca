"""Tensor parallelism on CPU: the engine benchmark's model (bench_engine.py's SHAPE) split over 2 ranks
(gloo) against 1, single stream and 32 concurrent requests, the two engines taking turns.

On the project's 2-core box the ranks share the cores (one thread each instead of two) and every
layer adds two all-reduces and the logits a gather through gloo, so N=2 is expected to be slower here:
the figures say by how much. Tensor parallelism is for models that do not fit one GPU.

    .venv/bin/python benchmarks/bench_tp.py [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from bench_engine import SHAPE, prompts, run_engine

from glm4serve.engine.config import EngineArgs
from glm4serve.model.random_checkpoint import write_random_checkpoint
from glm4serve.server import build_llm_engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(d, **SHAPE)
        engines = {n: build_llm_engine(EngineArgs(model=str(path), dtype="float32", tensor_parallel_size=n,
                                                  kv_cache_memory=1 << 30)) for n in (1, 2)}
    try:
        one, many = prompts(1, 32), prompts(a.batch, 32, seed=1)
        for e in engines.values():
            run_engine(e, one, 8)  # warm-up
        single = {n: [] for n in engines}
        batch = {n: [] for n in engines}
        for _ in range(a.repeats):
            for n, e in engines.items():
                single[n].append(a.new_tokens / run_engine(e, one, a.new_tokens))
                batch[n].append(a.batch * a.new_tokens / run_engine(e, many, a.new_tokens))
        for n, e in engines.items():
            print(f"N={n} ({e.runner!r}): single stream {statistics.median(single[n]):.1f} tokens/s (runs "
                  f"{' / '.join(f'{r:.1f}' for r in single[n])}), {a.batch} concurrent "
                  f"{statistics.median(batch[n]):.0f} tokens/s (runs {' / '.join(f'{r:.0f}' for r in batch[n])})")
        s1, s2 = statistics.median(single[1]), statistics.median(single[2])
        b1, b2 = statistics.median(batch[1]), statistics.median(batch[2])
        print(f"N=2 / N=1: single stream {s2 / s1:.2f}x, {a.batch} concurrent {b2 / b1:.2f}x")
    finally:
        for e in engines.values():
            e.close()


if __name__ == "__main__":
    main()
