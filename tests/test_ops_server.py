"""Robustness against the real server (uvicorn subprocess, our engine, a random GLM-4 checkpoint):
64 concurrent streams with mixed prompt lengths, 20 of which hang up mid-stream; overload with a
small queue (429 at once, the admitted ones finish); SIGTERM while streaming (the streams finish,
new requests get 503, exit 0)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass

import httpx
import pytest

from server_proc import ServerProcess

pytestmark = pytest.mark.slow


@dataclass
class StreamResult:
    status: int
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: dict | None = None
    done: bool = False  # saw data: [DONE]
    hung_up: bool = False
    retry_after: str | None = None
    seconds_to_status: float = 0.0


def chat_body(words: int, max_tokens: int, stream: bool = True) -> dict:
    body = {"messages": [{"role": "user", "content": " ".join(f"w{i % 97}" for i in range(words))}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, hang_up_after: int | None = None,
                      on_first_content: asyncio.Event | None = None) -> StreamResult:
    t0 = time.monotonic()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        res = StreamResult(r.status_code, seconds_to_status=time.monotonic() - t0,
                           retry_after=r.headers.get("retry-after"))
        if r.status_code != 200:
            await r.aread()
            res.error = r.json()["error"]
            return res
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                res.done = True
                break
            event = json.loads(data)
            if "error" in event:
                res.error = event["error"]
                continue
            if event.get("usage"):
                res.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                res.text += choice["delta"].get("content") or ""
                res.finish_reason = choice.get("finish_reason") or res.finish_reason
                if choice["delta"].get("content") and on_first_content is not None:
                    on_first_content.set()
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                res.hung_up = True
                return res  # leaving the block closes the connection mid-stream
    return res


async def whole_chat(client: httpx.AsyncClient, url: str, body: dict) -> StreamResult:
    t0 = time.monotonic()
    r = await client.post(url + "/v1/chat/completions", json=body)
    res = StreamResult(r.status_code, seconds_to_status=time.monotonic() - t0, retry_after=r.headers.get("retry-after"))
    if r.status_code == 200:
        res.completion_tokens = r.json()["usage"]["completion_tokens"]
        res.finish_reason = r.json()["choices"][0]["finish_reason"]
    else:
        res.error = r.json()["error"]
    return res


def wait_idle(s: ServerProcess, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = s.metrics()
        if (m["glm4serve:num_requests_running"], m["glm4serve:num_requests_waiting"],
                m["glm4serve:kv_cache_blocks_used"], m["glm4serve:num_requests_admitted"]) == (0, 0, 0, 0):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: { {k: v for k, v in m.items() if 'num_requests' in k or 'kv' in k} }")
        time.sleep(0.1)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))


# --- load --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(make_checkpoint):
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--max-num-seqs", "64").wait_healthy()
    yield s
    s.stop()


def test_64_concurrent_streams_with_20_hang_ups(server):
    before = server.metrics()
    # mixed prompt lengths (1..~600 tokens) and lengths; every 16th prompt is long
    jobs = []
    for i in range(64):
        words = 300 if i % 16 == 0 else 1 + (i * 37) % 120
        if i % 3 == 1 and i < 60:  # 20 of them hang up after a few chunks of a long reply
            jobs.append((words, 2000, 2 + i % 5))
        else:
            jobs.append((words, 8 + (i * 7) % 33, None))
    assert sum(1 for j in jobs if j[2]) == 20

    async def main():
        async with client() as c:
            return await asyncio.gather(*(stream_chat(c, server.url, chat_body(w, m), hang_up_after=h)
                                          for w, m, h in jobs))

    results = asyncio.run(main())
    for (words, max_tokens, hang_up), res in zip(jobs, results):
        assert res.status == 200 and res.error is None, res
        if hang_up:
            assert res.hung_up and not res.done
            continue
        assert res.done and res.finish_reason == "length", res
        assert res.completion_tokens == max_tokens, (words, max_tokens, res)

    after = wait_idle(server)  # the 20 hung-up requests were aborted and their blocks came back
    assert after["glm4serve:kv_cache_blocks_total"] > 0
    finished = after['glm4serve:request_success_total{finished_reason="length"}'] - before.get(
        'glm4serve:request_success_total{finished_reason="length"}', 0)
    assert finished == 44
    generated = after["glm4serve:generation_tokens_total"] - before["glm4serve:generation_tokens_total"]
    assert generated >= sum(m for _, m, h in jobs if not h)
    queued = after["glm4serve:request_queue_time_seconds_count"] - before["glm4serve:request_queue_time_seconds_count"]
    assert queued == 64  # every request was scheduled once (the hung-up ones too)

    # the survivors were unaffected: the same greedy request alone gives the same text
    words, max_tokens, _ = jobs[2]
    alone = asyncio.run(_one(server.url, chat_body(words, max_tokens)))
    assert alone.text == results[2].text and alone.completion_tokens == max_tokens


async def _one(url: str, body: dict) -> StreamResult:
    async with client() as c:
        return await stream_chat(c, url, body)


# --- overload ----------------------------------------------------------------------------------


def test_overload_gets_429_at_once_and_the_admitted_finish(make_checkpoint):
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--max-num-seqs", "2",
                      "--max-waiting-requests", "2").wait_healthy()
    try:
        max_tokens = 400

        async def main():
            async with client() as c:
                calls = [stream_chat(c, s.url, chat_body(10 + i, max_tokens)) if i % 2 == 0
                         else whole_chat(c, s.url, chat_body(10 + i, max_tokens, stream=False)) for i in range(12)]
                burst = asyncio.gather(*calls)
                # while the admitted four run: two in the batch, two in the engine's queue
                seen = None
                for _ in range(200):
                    await asyncio.sleep(0.02)
                    m = await asyncio.to_thread(s.metrics)
                    if m["glm4serve:num_requests_running"] == 2 and m["glm4serve:num_requests_waiting"] == 2:
                        seen = m
                        break
                return await burst, seen

        results, seen = asyncio.run(main())
        assert seen is not None, "never saw 2 running + 2 waiting"
        admitted = [r for r in results if r.status == 200]
        refused = [r for r in results if r.status == 429]
        assert len(admitted) == 4 and len(refused) == 8, [r.status for r in results]
        for r in admitted:
            assert r.completion_tokens == max_tokens and r.finish_reason == "length" and r.error is None, r
        for r in refused:
            assert r.error["type"] == "rate_limit_error" and r.retry_after == "1"
            assert r.seconds_to_status < 1.0, r  # refused at once, not after waiting
        assert any(r.status == 429 for r in results[0::2]) and any(r.status == 429 for r in results[1::2])
        m = wait_idle(s)
        assert m['glm4serve:request_rejected_total{reason="queue_full"}'] == 8
        # room again: the next request is admitted
        again = asyncio.run(_one(s.url, chat_body(5, 3)))
        assert again.status == 200 and again.completion_tokens == 3
    finally:
        s.stop()


# --- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_while_streaming_finishes_streams_refuses_new_and_exits_0(make_checkpoint):
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--graceful-shutdown-seconds", "60").wait_healthy()
    max_tokens = 600

    async def main():
        async with client() as c:
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(stream_chat(c, s.url, chat_body(20 + i, max_tokens), on_first_content=e))
                       for i, e in enumerate(started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            os.kill(s.proc.pid, signal.SIGTERM)
            health = None
            for _ in range(100):  # the signal is handled between two event-loop turns
                health = await c.get(s.url + "/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.02)
            new = await c.post(s.url + "/v1/chat/completions", json=chat_body(3, 5, stream=False))
            in_flight_when_refused = not all(t.done() for t in streams)
            return await asyncio.gather(*streams), health, new, in_flight_when_refused

    try:
        results, health, new, in_flight_when_refused = asyncio.run(main())
        assert health.status_code == 503 and health.headers["retry-after"] == "5"
        assert new.status_code == 503 and new.json()["error"]["type"] == "service_unavailable_error"
        assert new.headers["retry-after"]
        assert in_flight_when_refused  # the refusal came during the drain, not after it
        for r in results:
            assert r.status == 200 and r.error is None and r.done, r
            assert r.completion_tokens == max_tokens and r.finish_reason == "length"
        assert s.proc.wait(30) == 0
        log = s.log_path.read_text()
        assert "shutting down" in log and "drained" in log
    finally:
        s.stop()
