"""Structured output (issue 5): decode tokens/s of grammar-constrained requests vs unconstrained
ones on the same checkpoint, in the same run.

The GLM-4-shaped random checkpoint of bench_engine.py (vocab 151,552, hidden 512, 4 layers,
float32), 2 threads, 32-token prompts, greedy. The tokenizer is glm-4-9b-chat's real one (151,343
tokens, so the grammar masks the full vocabulary) when ../shared/models/glm-4-9b-chat is there
(or --tokenizer DIR); otherwise the checkpoint's small built-in tokenizer (a few thousand tokens,
a cheaper mask). Decode speed is (tokens - 1) / (time of the last token - time of the first), so
the prefill is left out; each figure is the best of --repeats runs.

    .venv/bin/python benchmarks/bench_guided.py [--tokens 128] [--tokenizer DIR | --small-tokenizer]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import SHAPE, prompts

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import GuidedSpec
from glm4serve.engine.types import SamplingParams
from glm4serve.model.random_checkpoint import write_random_checkpoint
from glm4serve.server import build_llm_engine

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "glm-4-9b-chat"

# Long enough to decode for a while, bounded so that even a random model's reply finishes.
ORDERS = {
    "type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99999},
            "status": {"enum": ["open", "paid", "shipped", "cancelled"]},
            "note": {"type": "string", "maxLength": 24},
            "items": {"type": "array", "maxItems": 3, "items": {"enum": ["apple", "pear", "fig"]}},
        },
        "required": ["id", "status", "note", "items"],
    },
}
WEATHER_TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                     "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]},
    "get_time": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 40}}, "required": ["tz"]},
}
ARTICLE = {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
           "required": ["title", "body"]}
SPECS = {
    "json_schema, free strings (runs to max_tokens)": GuidedSpec.json_schema(ARTICLE),
    "json_schema, 4 orders (bounded strings, enums)": GuidedSpec.json_schema(ORDERS),
    "tool_call (required, 2 tools)": GuidedSpec.tool_call(WEATHER_TOOLS),
}


def make_checkpoint(d: str, tokenizer_dir: Path | None) -> Path:
    path = write_random_checkpoint(d, **SHAPE)
    if tokenizer_dir is not None:  # the real tokenizer and its stop ids, in the temporary copy only
        (path / "tokenizer.json").unlink(missing_ok=True)
        for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def decode(engine: LLMEngine, batch: list[list[int]], params: list[SamplingParams]) -> tuple[float, int]:
    """Aggregate decode tokens/s of the batch, and the tokens each request made (the minimum)."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    for i, (p, sp) in enumerate(zip(batch, params)):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", p, sp)
    while engine.has_work:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
            count[o.request_id] = o.num_output_tokens
    assert not engine.pop_errors()
    span = max(last.values()) - min(first.values())
    return (sum(count.values()) - len(count)) / span, min(count.values())


def interleaved(engine: LLMEngine, cases: dict[str, tuple[list[list[int]], list[SamplingParams]]],
                repeats: int) -> dict[str, tuple[float, int]]:
    """Best tokens/s of each case over `repeats` rounds, the cases taking turns within each round,
    so that a load change on the machine hits them all alike."""
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (batch, params) in cases.items():
            results[name].append(decode(engine, batch, params))
    return {name: (max(r[0] for r in runs), runs[0][1]) for name, runs in results.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", type=Path, default=REAL_TOKENIZER)
    ap.add_argument("--small-tokenizer", action="store_true", help="the checkpoint's own small tokenizer")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer_dir = None if a.small_tokenizer or not a.tokenizer.is_dir() else a.tokenizer
    with tempfile.TemporaryDirectory() as d:
        engine = build_llm_engine(EngineArgs(model=str(make_checkpoint(d, tokenizer_dir)), dtype="float32",
                                             max_num_seqs=64, kv_cache_memory=1 << 30))
    tok = engine.tokenizer
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokenizer "
          f"{tokenizer_dir or 'small built-in'} ({tok.vocab_size} tokens)")

    t0 = time.perf_counter()
    engine.grammars.compile(GuidedSpec.json_object())  # loads xgrammar, builds the vocabulary tables
    print(f"first grammar (xgrammar import + tokenizer tables + compile): {time.perf_counter() - t0:.2f} s")
    for name, spec in SPECS.items():
        t0 = time.perf_counter()
        engine.grammars.compile(spec)
        print(f"  compile {name}: {(time.perf_counter() - t0) * 1e3:.0f} ms")

    one = prompts(1, 32)
    free = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    decode(engine, one, [SamplingParams(max_tokens=8, temperature=0.0)])  # warm-up
    cases = {"unconstrained": (one, [free])}
    cases |= {name: (one, [SamplingParams(max_tokens=a.tokens, temperature=0.0, guided=spec)])
              for name, spec in SPECS.items()}
    single = interleaved(engine, cases, a.repeats)
    base = single["unconstrained"][0]
    print(f"single stream, unconstrained: {base:.1f} tokens/s")
    for name in SPECS:
        rate, n = single[name]
        print(f"single stream, {name}: {rate:.1f} tokens/s over {n} tokens = {rate / base:.1%} of unconstrained")

    many = prompts(a.batch, 32, seed=1)
    spec = SPECS["json_schema, 4 orders (bounded strings, enums)"]
    half = [SamplingParams(max_tokens=a.tokens, temperature=0.0, guided=spec) if i % 2 else free
            for i in range(a.batch)]
    batched = interleaved(engine, {"free": (many, [free] * a.batch), "half": (many, half)}, a.repeats)
    base_b, mixed = batched["free"][0], batched["half"][0]
    print(f"{a.batch} concurrent, unconstrained: {base_b:.0f} tokens/s aggregate; half of them json_schema "
          f"(4 orders): {mixed:.0f} tokens/s = {mixed / base_b:.1%}")


if __name__ == "__main__":
    main()
