"""What the priority scheduling policy buys a late, urgent request on a busy server (CPU): a server
with few seats (--max-num-seqs) holds a queue of long low-priority completions, then one short
request arrives. Its time to first token is timed under `--scheduling-policy fcfs` (it waits for the
queue) and `priority` (it preempts a running low-priority request), on a slice of glm-4-9b-chat
(its exact layer shapes, random bf16 weights, int8). Replies are not compared with the same requests
served alone: int8 products of two rows round differently from one row's, and a random model's near
ties then flip a greedy token whatever the policy (tests/test_scheduler.py pins that preemption
changes no token, over a fake model).

    .venv/bin/python benchmarks/bench_priority.py [--layers 2] [--seats 2] [--queued 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_proc import ServerProcess  # noqa: E402

from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint  # noqa: E402


async def first_token_s(client: httpx.AsyncClient, url: str, body: dict) -> float:
    """Seconds to the first text of one streamed completion (read to its end)."""
    t0, first = time.monotonic(), None
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"]:
                    first = first or time.monotonic() - t0
    return first


async def preemptions(client: httpx.AsyncClient, url: str) -> float:
    for line in (await client.get(url + "/metrics")).text.splitlines():
        if line.startswith("glm4serve:num_preemptions_total "):
            return float(line.split()[1])
    return float("nan")


async def run(url: str, a, priority: bool) -> dict:
    def body(prompt: str, max_tokens: int, rank: int) -> dict:
        extra = {"priority": rank} if priority else {}
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}

    queued = [body(f"a long report, part {i}: " + "data " * 40, a.tokens, 5) for i in range(a.queued)]
    late = body("urgent: " + "status " * 10, 8, 0)
    async with httpx.AsyncClient(timeout=1800) as client:
        await first_token_s(client, url, late)  # warm-up
        before = await preemptions(client, url)
        tasks = []
        for b in queued:
            tasks.append(asyncio.create_task(first_token_s(client, url, b)))
            await asyncio.sleep(0.05)
        await asyncio.sleep(a.late_after)
        t0 = time.monotonic()
        urgent_ttft = await first_token_s(client, url, late)
        urgent_done = time.monotonic() - t0
        results = await asyncio.gather(*tasks)
        after = await preemptions(client, url)
    return {"urgent_ttft": urgent_ttft, "urgent_done": urgent_done, "queued_ttft": statistics.median(results),
            "preemptions": after - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="of glm-4-9b-chat's 40")
    ap.add_argument("--seats", type=int, default=2, help="--max-num-seqs")
    ap.add_argument("--queued", type=int, default=8, help="long low-priority requests ahead of the urgent one")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each queued request writes")
    ap.add_argument("--late-after", type=float, default=2.0, help="seconds after the queue the urgent one comes")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": a.layers})
        for policy in ("fcfs", "priority"):
            server = ServerProcess(Path(d), "--quantization", "int8", "--max-model-len", "4096",
                                   "--max-num-seqs", str(a.seats), "--scheduling-policy", policy,
                                   "--no-enable-prefix-caching", dtype="auto").wait_healthy(timeout=600)
            try:
                r = asyncio.run(run(server.url, a, policy == "priority"))
            finally:
                server.stop()
            print(f"{policy:8s}: urgent request's first token {r['urgent_ttft']:.2f} s (done in "
                  f"{r['urgent_done']:.2f} s); queued requests' median first token {r['queued_ttft']:.2f} s; "
                  f"{r['preemptions']:.0f} preemptions", flush=True)


if __name__ == "__main__":
    main()
