"""What a long prompt costs the requests decoding beside it, and what --long-prefill-token-threshold buys
them (CPU): on a slice of glm-4-9b-chat (its exact layer shapes, --layers of its 40, random bf16 weights,
the checkpoint bench_prefill.py writes), for each threshold:
- alone: the seconds to the first token of a --tokens prompt with nothing else running;
- beside --decoders requests that decode: that prompt's time to its first token, and the decoders' gaps
  between tokens while it prefills (the longest, the median) against their usual gap before it came;
- a --short-token prompt arriving once the long one has taken a step: its time to its first token.
Each case a new prompt (no prefix cache); the thresholds take turns, --repeats rounds.

    .venv/bin/python benchmarks/bench_long_prefill.py [--layers 40] [--mode int8] [--tokens 4096]
        [--decoders 4] [--thresholds 0,512,256] [--short 64] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from bench_prefill import VOCAB, slice_checkpoint  # noqa: E402 - benchmarks/ is the script's folder
from glm4serve.server import build_llm_engine

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)
PROMPTS = itertools.count()


def prompt(n: int) -> list[int]:
    g = torch.Generator().manual_seed(next(PROMPTS))
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def alone(engine, n: int) -> float:
    engine.add_request("alone", prompt(n), GREEDY)
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - t0


def short_behind(engine, n: int, short: int) -> float:
    """Seconds to the first token of a `short`-token prompt that arrives once an `n`-token one has taken a step."""
    engine.add_request("long", prompt(n), GREEDY)
    engine.step()
    engine.add_request("short", prompt(short), GREEDY)
    t0, first = time.perf_counter(), None
    while engine.has_work:
        for o in engine.step():
            if o.request_id == "short":
                first = time.perf_counter() - t0
    return first


def beside_decoders(engine, long_ids: list[int], decoder_prompts: list[list[int]], warm_steps: int = 6) -> dict:
    """A prompt arriving once requests of `decoder_prompts` decode (`warm_steps` after they came): seconds to its
    first token and the steps it took, and the decoders' gaps between tokens (seconds): their usual one before it
    came (the median), the longest and the median while it prefilled."""
    forever = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(decoder_prompts):
        engine.add_request(f"d{i}", p, forever)
    last: dict[str, float] = {}
    before: list[float] = []
    for _ in range(warm_steps):  # every decoder past its prompt, then their usual gap
        for o in engine.step():
            now = time.perf_counter()
            if o.request_id in last:
                before.append(now - last[o.request_id])
            last[o.request_id] = now
    engine.add_request("long", long_ids, GREEDY)
    t0, first, during, steps = time.perf_counter(), None, [], 0
    while first is None:
        outs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            if o.request_id == "long":
                first = now - t0
            else:
                during.append(now - last[o.request_id])
                last[o.request_id] = now
    for i in range(len(decoder_prompts)):
        engine.abort(f"d{i}")
    while engine.has_work:
        engine.step()
    return {"first": first, "steps": steps, "usual": statistics.median(before), "max": max(during),
            "median": statistics.median(during)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--mode", choices=["bf16", "int8", "int4"], default="int8")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--thresholds", default="0,512,256")
    ap.add_argument("--short", type=int, default=64, help="a prompt this long arrives behind the long one (0: none)")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    thresholds = [int(t) for t in a.thresholds.split(",")]
    path = slice_checkpoint(a.layers)
    engine = build_llm_engine(EngineArgs(model=str(path), dtype="bfloat16",
                                         quantization=None if a.mode == "bf16" else a.mode,
                                         kv_cache_memory="2GiB", enable_prefix_caching=False))
    budget = engine.scheduler.cfg.max_num_batched_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.layers}-layer slice of glm-4-9b-chat, "
          f"{a.mode}; a {a.tokens}-token prompt, {a.decoders} decoders; step budget {budget} tokens", flush=True)
    for t in thresholds:  # warm-up: oneDNN compiles each chunk's shape the first time it meets it
        engine.scheduler.cfg = dataclasses.replace(engine.scheduler.cfg, long_prefill_token_threshold=t)
        alone(engine, min(t or budget, budget) + 16)
    rows: dict[int, list[tuple[float, dict]]] = {t: [] for t in thresholds}
    for _ in range(a.repeats):
        for t in thresholds:
            engine.scheduler.cfg = dataclasses.replace(engine.scheduler.cfg, long_prefill_token_threshold=t)
            lone = alone(engine, a.tokens)
            loaded = beside_decoders(engine, prompt(a.tokens), [prompt(32) for _ in range(a.decoders)])
            loaded["short"] = short_behind(engine, a.tokens, a.short) if a.short else float("nan")
            rows[t].append((lone, loaded))
            print(f"threshold {t}: alone {lone:.2f} s; beside the decoders {loaded['first']:.2f} s over "
                  f"{loaded['steps']} steps, their gaps {loaded['max']:.2f} s longest / {loaded['median']:.2f} s "
                  f"median against {loaded['usual']:.2f} s before; a {a.short}-token prompt behind it: first token "
                  f"in {loaded['short']:.2f} s", flush=True)
    print("\n| threshold | alone (s) | beside the decoders (s) | decoders' longest gap (s) | their median gap (s) "
          f"| their usual gap (s) | a {a.short}-token prompt behind it (s) |\n|---|---|---|---|---|---|---|")
    for t, runs in rows.items():
        def col(f):
            return " / ".join(f"{f(lone, loaded):.2f}" for lone, loaded in runs)
        print(f"| {t or 'none'} | {col(lambda lone, _: lone)} | {col(lambda _, d: d['first'])} | "
              f"{col(lambda _, d: d['max'])} | {col(lambda _, d: d['median'])} | {col(lambda _, d: d['usual'])} | "
              f"{col(lambda _, d: d['short'])} |")


if __name__ == "__main__":
    main()
