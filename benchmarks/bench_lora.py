"""What serving LoRA adapters costs, on a slice of glm-4-9b-chat (exact layer shapes, --layers of them,
full vocabulary): an engine started without adapters against one started with a rank --rank adapter
on every linear of every layer, in one process, taking turns (medians of --repeats):
- decode step at 1 and 8 streams: the plain engine; the adapters' engine running the base model (its
  wrapped linears with no adapter rows); running the adapter; 8 streams half and half;
- the prefill of a 1,024-token prompt, plain against the adapter.

    .venv/bin/python benchmarks/bench_lora.py [--layers 2] [--rank 16] [--quantization int8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench_bf16_kernel import prefill_ms
from bench_int8_kernel import decode_ms
from glm4serve.engine.config import EngineArgs
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_adapter, write_random_checkpoint
from glm4serve.server import build_llm_engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quantization", default="int8", choices=["int8", "int4", "none"])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_random_checkpoint(Path(d) / "model", **{**GLM4_9B_CHAT, "dtype": "bfloat16",
                                                             "num_layers": a.layers})
        adapter = write_random_adapter(Path(d) / "lora", path, rank=a.rank, alpha=2.0 * a.rank)
        args = dict(model=str(path), dtype="bfloat16", kv_cache_memory="1GiB", max_num_seqs=32,
                    quantization=None if a.quantization == "none" else a.quantization)
        plain = build_llm_engine(EngineArgs(**args))
        served = build_llm_engine(EngineArgs(**args, lora_modules={"r": str(adapter)}))
        cases = {
            "decode step, 1 stream": [(plain, lambda e: decode_ms(e, 1, 16)),
                                      (served, lambda e: decode_ms(e, 1, 16)),
                                      (served, lambda e: decode_ms(e, 1, 16, ["r"]))],
            "decode step, 8 streams": [(plain, lambda e: decode_ms(e, 8, 16)),
                                       (served, lambda e: decode_ms(e, 8, 16)),
                                       (served, lambda e: decode_ms(e, 8, 16, ["r"] * 8)),
                                       (served, lambda e: decode_ms(e, 8, 16, ["r", None] * 4))],
            "prefill of 1,024 tokens": [(plain, lambda e: prefill_ms(e, 1024)),
                                        (served, lambda e: prefill_ms(e, 1024, "r"))],
        }
        columns = ["no adapters loaded", "adapters loaded, base model", "the adapter", "half and half"]
        print(f"{a.layers}-layer 9B slice, {a.quantization}, a rank-{a.rank} adapter on every linear "
              f"(ms, medians of {a.repeats}):\n")
        print("| | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for what, runs in cases.items():
            times = [[] for _ in runs]
            for engine, run in runs:  # once untimed: each product shape's first use builds its kernel
                run(engine)
            for _ in range(a.repeats):
                for t, (engine, run) in zip(times, runs):
                    t.append(run(engine))
            base = statistics.median(times[0])
            cells = [f"{base:.1f}"] + [f"{statistics.median(t):.1f} ({statistics.median(t) / base:.2f}x)"
                                       for t in times[1:]]
            if what.startswith("prefill"):  # plain against the adapter
                cells = [cells[0], "", cells[1], ""]
            cells += [""] * (len(columns) - len(cells))
            print(f"| {what} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
