"""The engine benchmark through the HTTP server: the same checkpoint and workload as
bench_engine.py, sent as streaming /v1/completions requests to a real `glm4serve serve` process,
against transformers generate() measured in the same run.

    .venv/bin/python benchmarks/bench_http.py [--new-tokens 128] [--batch 32] [--repeats 3]

Throughputs are medians of --repeats runs, ours and transformers alike.

The client shares the server's two cores, so what it spends per token is taken from the server.
The single stream is read with the standard library's blocking http.client (~0.1 ms of CPU a
token, every event still parsed); the concurrent streams with httpx's asyncio client (~0.5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Before torch is imported: transformers' weights on transparent huge pages, as our CPU runner puts
# its own weights and KV cache. The server runs as users run it, with torch's default allocator.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_engine import SHAPE, median_rate, prompts, read_bandwidth_gbs, run_hf  # noqa: E402
from server_proc import ServerProcess  # noqa: E402

from glm4serve.model.random_checkpoint import write_random_checkpoint  # noqa: E402


async def one_stream(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> int:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


def blocking_stream(url: str, prompt: list[int], new_tokens: int) -> float:
    """One streamed completion read line by line, every event parsed -> seconds to the last byte."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.status
    tokens = 0
    while line := r.readline():  # http.client undoes the chunked transfer encoding
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage")
            if usage:
                tokens = usage["completion_tokens"]
    dt = time.perf_counter() - t0
    conn.close()
    assert tokens == new_tokens, tokens
    return dt


async def run_http(url: str, batch: list[list[int]], new_tokens: int) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(batch) + 4)) as client:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_stream(client, url, p, new_tokens) for p in batch))
        dt = time.perf_counter() - t0
    assert got == [new_tokens] * len(batch), got
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, **SHAPE)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        server = ServerProcess(Path(d), "--served-model-name", "bench", "--max-num-seqs", "64",
                               "--kv-cache-memory", "1GiB", env={"THP_MEM_ALLOC_ENABLE": "0"}).wait_healthy()
        try:
            one = prompts(1, a.prompt_tokens)
            many = prompts(a.batch, a.prompt_tokens, seed=1)
            asyncio.run(run_http(server.url, one, 8))  # warm-up
            # The machine's memory reads at ~33-36 or ~55-70 GB/s, switching over time: a read
            # right after each run says which one the server ran in.
            probe, reads = torch.ones(1 << 28), []

            def single_run() -> float:
                dt = blocking_stream(server.url, one[0], a.new_tokens)
                reads.append(read_bandwidth_gbs(probe))
                return dt

            ours1, runs1 = median_rate(a.new_tokens, single_run, a.repeats)
            del probe
            oursb, runsb = median_rate(a.batch * a.new_tokens,
                                       lambda: asyncio.run(run_http(server.url, many, a.new_tokens)), a.repeats)
        finally:
            server.stop()
    run_hf(hf, one, 4)
    ref1, hf_runs1 = median_rate(a.new_tokens, lambda: run_hf(hf, one, a.new_tokens), a.repeats)
    refb, hf_runsb = median_rate(a.batch * a.new_tokens, lambda: run_hf(hf, many, a.new_tokens), a.repeats)
    print(f"HTTP single stream: ours {ours1:.1f} tokens/s (runs {runs1}; memory read at "
          f"{' / '.join(f'{r:.1f}' for r in reads)} GB/s right after each), transformers generate() {ref1:.1f} "
          f"tokens/s (runs {hf_runs1}), ratio {ours1 / ref1:.2f}x")
    print(f"HTTP {a.batch} concurrent streams: ours {oursb:.0f} tokens/s aggregate (runs {runsb}), transformers "
          f"generate() static batch {refb:.0f} tokens/s (runs {hf_runsb}), ratio {oursb / refb:.2f}x")


if __name__ == "__main__":
    main()
