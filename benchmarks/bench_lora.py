"""What serving LoRA adapters costs, on a slice of glm-4-9b-chat (exact layer shapes, --layers of them,
full vocabulary): an engine started without adapters against one started with a rank --rank adapter
on every linear of every layer, in one process, taking turns (medians of --repeats):
- decode step at 1 and 8 streams: the plain engine; the adapters' engine running the base model (its
  wrapped linears with no adapter rows); running the adapter; 8 streams half and half;
- the prefill of a 1,024-token prompt, plain against the adapter;
- loading the adapter while the server runs (/v1/load_lora_adapter: the engine's steps wait for it),
  and unloading it. `--model DIR` times just that on a checkpoint of its own (all 40 layers).

    .venv/bin/python benchmarks/bench_lora.py [--layers 2] [--rank 16] [--quantization int8] [--repeats 5]
        [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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
    ap.add_argument("--model", help="time loading an adapter for this checkpoint, and nothing else")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = a.model or write_random_checkpoint(Path(d) / "model", **{**GLM4_9B_CHAT, "dtype": "bfloat16",
                                                                        "num_layers": a.layers})
        adapter = write_random_adapter(Path(d) / "lora", path, rank=a.rank, alpha=2.0 * a.rank)
        args = dict(model=str(path), dtype="bfloat16", kv_cache_memory="1GiB", max_num_seqs=32,
                    quantization=None if a.quantization == "none" else a.quantization)
        if a.model:
            engine = build_llm_engine(EngineArgs(**args, allow_runtime_lora_updating=True))
            runtime_load(engine, adapter, a.repeats)
            return
        plain = build_llm_engine(EngineArgs(**args))
        served = build_llm_engine(EngineArgs(**args, lora_modules={"r": str(adapter)},
                                                 allow_runtime_lora_updating=True))
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
        runtime_load(served, adapter, a.repeats)


def runtime_load(engine, adapter: Path, repeats: int) -> None:
    """Load the adapter into a running engine under a new name and unload it, `repeats` times."""
    size = sum(f.stat().st_size for f in adapter.iterdir()) / 1e6
    loads, unloads = [], []
    for i in range(repeats + 1):  # the first untimed: the file's first read comes from the disk
        t0 = time.perf_counter()
        engine.load_lora(f"late{i}", str(adapter))
        t1 = time.perf_counter()
        engine.unload_lora(f"late{i}")
        t2 = time.perf_counter()
        if i:
            loads.append(1e3 * (t1 - t0))
            unloads.append(1e3 * (t2 - t1))
    print(f"\nloading the {size:.0f} MB adapter into the running engine: {statistics.median(loads):.1f} ms "
          f"(runs {', '.join(f'{t:.0f}' for t in loads)}); unloading it: {statistics.median(unloads):.2f} ms "
          f"(medians of {repeats})", flush=True)


if __name__ == "__main__":
    main()
