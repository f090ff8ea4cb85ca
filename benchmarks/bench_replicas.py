"""Two engine replicas (Ray Serve, glm4serve/cluster.py) against one server on the same box: the prefix
cache's hit rate on multi-turn conversations, and the aggregate throughput.

The workload: 8 conversations with one system prompt in common, run side by side, each `--turns` turns
long; every turn sends the whole conversation so far (as chat clients do) and gets `--max-tokens` new
tokens. A conversation's later turns find their earlier turns' KV blocks in the prefix cache only if
they reach the same replica: the router's affinity is what keeps the hit rate up.

    .venv/bin/python benchmarks/bench_replicas.py [--turns 4] [--max-tokens 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_proc import ServerProcess  # noqa: E402

SYSTEM = ("You are a careful assistant for a hardware store. Answer in two sentences, name the aisle, "
          "and never invent a product that is not on the shelves. ") * 3
TOPICS = ["paint", "screws", "garden hoses", "light bulbs", "glue", "ladders", "tiles", "door locks"]


def conversation(url: str, topic: str, turns: int, max_tokens: int) -> int:
    messages = [{"role": "system", "content": SYSTEM}]
    tokens = 0
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1} about {topic}: what do you have?"})
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        body = r.json()
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"] or ""})
        tokens += body["usage"]["completion_tokens"]
    return tokens


def prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) in prompt tokens, summed over the replicas."""
    hits = queries = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(r"glm4serve:prefix_cache_(hits|queries)_total(\{[^}]*\})? (\S+)", line)
        if m:
            if m.group(1) == "hits":
                hits += float(m.group(3))
            else:
                queries += float(m.group(3))
    return hits, queries


def run(server: ServerProcess, turns: int, max_tokens: int) -> tuple[float, float]:
    """-> (hit rate, generated tokens/s) of the 8 conversations side by side."""
    h0, q0 = prefix_cache(server.url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(TOPICS)) as pool:
        tokens = sum(pool.map(lambda t: conversation(server.url, t, turns, max_tokens), TOPICS))
    elapsed = time.perf_counter() - t0
    time.sleep(2.5)  # the replicas report their counters every second
    h1, q1 = prefix_cache(server.url)
    return (h1 - h0) / (q1 - q0), tokens / elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", help="checkpoint folder (default: the built-in demo model)")
    a = ap.parse_args()
    model = Path(a.model) if a.model else None
    results = {}
    for replicas in (1, 2):
        server = ServerProcess(model, "--served-model-name", "bench", "--num-replicas", str(replicas),
                               kv_cache_memory="256MiB")
        try:
            server.wait_healthy(timeout=300)
            while replicas > 1 and httpx.get(server.url + "/health").json().get("replicas_up") != replicas:
                time.sleep(0.5)
            conversation(server.url, "warm-up", 1, 4)
            results[replicas] = run(server, a.turns, a.max_tokens)
        finally:
            server.stop(timeout=120)
        hit, rate = results[replicas]
        print(f"{replicas} replica(s): prefix cache hit rate {hit:.1%}, {rate:.0f} generated tokens/s")
    (hit1, rate1), (hit2, rate2) = results[1], results[2]
    print(f"2 replicas / 1: hit rate {hit2 / hit1:.2f}x (target >= 0.80), throughput {rate2 / rate1:.2f}x")


if __name__ == "__main__":
    main()
