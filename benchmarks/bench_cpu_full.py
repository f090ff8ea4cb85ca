"""The full glm-4-9b-chat on a CPU box: all 40 layers, random bf16 weights (~19 GB on disk), served
as bf16 (`--quantization none`: ~19 GB resident, for a 24 GB box only just) or with weight-only
quantization through the real server. Records the load time, the server's resident
memory and single-stream decode tokens/s.

The checkpoint is made by `glm4serve make-model --like glm-4-9b-chat` into ~/.cache/glm4serve/ on the
first run (minutes; never part of the repository).

    .venv/bin/python benchmarks/bench_cpu_full.py [--quantization int8] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_cpu_peers import rss_gib, stream  # noqa: E402
from server_proc import ServerProcess  # noqa: E402

CHECKPOINT = Path.home() / ".cache" / "glm4serve" / "glm-4-9b-chat-random-bf16"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="int8", choices=["int8", "int4", "none"])
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    if not (CHECKPOINT / "config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "glm4serve.cli", "make-model", str(CHECKPOINT), "--like",
                        "glm-4-9b-chat", "--dtype", "bfloat16", "--shards", "10"], check=True)
        print(f"wrote {CHECKPOINT} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in CHECKPOINT.glob("*.safetensors"))
    t0 = time.perf_counter()
    quantization = [] if a.quantization == "none" else ["--quantization", a.quantization]
    server = ServerProcess(CHECKPOINT, *quantization, "--served-model-name", "bench",
                           dtype="bfloat16", kv_cache_memory=a.kv_cache_memory).wait_healthy(timeout=1800)
    load_s = time.perf_counter() - t0
    try:
        loaded_rss = rss_gib(server.proc.pid)
        stream(server.url, list(range(100, 132)), 4)  # warm-up
        rates = [stream(server.url, list(range(100, 132)), a.new_tokens)[1] for _ in range(a.repeats)]
        print(f"glm-4-9b-chat shapes, 40 layers, {size / 1e9:.1f} GB bf16 checkpoint, --quantization "
              f"{a.quantization}, KV cache {a.kv_cache_memory}: healthy after {load_s:.0f} s; resident "
              f"{loaded_rss:.2f} GiB after loading, {rss_gib(server.proc.pid):.2f} GiB after decoding; single "
              f"stream {statistics.median(rates):.2f} tokens/s (runs {' / '.join(f'{r:.2f}' for r in rates)})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
