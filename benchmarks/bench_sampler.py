"""Sampling at GLM-4's vocabulary (151,552 logits a row) on the CPU: the time of one Sampler call
for batches of 1, 8 and 64 rows, against the same sampler sorting every row whole (candidates = V,
the baseline, measured in the same run).

    .venv/bin/python benchmarks/bench_sampler.py [--threads 2] [--repeats 15] [--penalties]

Logits are random normal, scaled: x6 is peaked like a language model's next-token distribution
(top_p 0.8 keeps a handful of tokens), x1 is flat (top_p's set reaches past the 1024 candidates,
so those rows are sorted whole either way). Half the rows are seeded. Median of --repeats calls.

--penalties: rows with repetition, presence and frequency penalties, a 32,768-token prompt and a
reply of 1K or 16K tokens, one token more each call: the sequences' TokenCounts kept between calls
(what the engine does) against fresh ones each call (every token of prompt and reply counted again,
the baseline).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glm4serve.engine.processors import SampleRow, TokenCounts
from glm4serve.engine.sampler import Sampler, make_generator
from glm4serve.engine.types import SamplingParams

VOCAB = 151552
CASES = {"glm-4 defaults (t=0.8, top_p=0.8)": dict(temperature=0.8, top_p=0.8),
         "top_k=50, t=0.7": dict(temperature=0.7, top_k=50),
         "t=1.0 only": dict(temperature=1.0)}


def median_ms(sampler: Sampler, logits: torch.Tensor, rows: list[SampleRow], repeats: int) -> float:
    sampler(logits, rows)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sampler(logits, rows)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def penalty_step_ms(sampler: Sampler, logits: torch.Tensor, rows: list[SampleRow], repeats: int, kept: bool) -> float:
    times = []
    for i in range(repeats + 1):
        for r in rows:
            r.output_token_ids.append((i * 7919) % VOCAB)
            if not kept or r.token_counts is None:
                r.token_counts = TokenCounts()
        t0 = time.perf_counter()
        sampler(logits, rows)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])  # the first call of kept counts counts everything


def penalties(repeats: int) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.1, presence_penalty=0.5,
                            frequency_penalty=0.5)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (32768,), generator=gen).tolist()
    print(f"{'rows':>4} {'reply':>6}  {'kept counts ms':>15} {'recounted ms':>13} {'speed-up':>9}")
    for batch in (1, 8, 64):
        logits = torch.randn(batch, VOCAB, generator=gen) * 6
        for reply in (1024, 16384):
            def fresh_rows():
                return [SampleRow(params, prompt, torch.randint(0, VOCAB, (reply,), generator=gen).tolist(),
                                  None, frozenset()) for _ in range(batch)]
            n = max(3, repeats // (4 if batch == 64 else 1))
            a = penalty_step_ms(Sampler(), logits, fresh_rows(), n, kept=True)
            b = penalty_step_ms(Sampler(), logits, fresh_rows(), n, kept=False)
            print(f"{batch:>4} {reply:>6}  {a:15.2f} {b:13.2f} {b / a:8.1f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--penalties", action="store_true", help="time the penalties' counts instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.penalties:
        return penalties(args.repeats)
    ours, whole = Sampler(), Sampler(candidates=VOCAB)
    print(f"{'logits':8} {'rows':>4}  {'case':36} {'ours ms':>9} {'sort-all ms':>12} {'speed-up':>9}")
    for scale in (6.0, 1.0):
        for batch in (1, 8, 64):
            logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * scale
            for name, params in CASES.items():
                rows = [SampleRow(SamplingParams(**params), [], [], make_generator(7, i) if i % 2 else None,
                                  frozenset()) for i in range(batch)]
                repeats = max(3, args.repeats // (4 if batch == 64 else 1))
                a, b = median_ms(ours, logits, rows, repeats), median_ms(whole, logits, rows, repeats)
                print(f"x{scale:<7g} {batch:>4}  {name:36} {a:9.2f} {b:12.2f} {b / a:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
