"""Several engine replicas behind one server on Ray Serve (glm4serve/cluster.py), on loopback with CPU
replicas: the single-process server's greedy outputs, concurrent mixed requests spread over both
replicas, a killed replica's streams end with an error event while the others go on, the replica
comes back, and SIGTERM drains and exits 0. The ingress's client over fake replica streams: a stream left
early is cancelled on its replica, and the engine's own errors arrive as themselves."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server_proc import ServerProcess, without_model_name

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "你好，今天", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("glm", "hf", "wide")


def all_replicas_up(s: ServerProcess, n: int = 2, timeout: float = 120) -> ServerProcess:
    """/health is 200 once one replica serves; wait for all of them."""
    deadline = time.monotonic() + timeout
    while httpx.get(s.url + "/health", timeout=5).json().get("replicas_up") != n:
        assert time.monotonic() < deadline, "replicas did not all come up"
        time.sleep(0.5)
    return s


@pytest.fixture(scope="module")
def replicated(checkpoint):
    s = ServerProcess(checkpoint, "--served-model-name", "glm4-test", "--num-replicas", "2")
    yield all_replicas_up(s.wait_healthy(timeout=240))
    s.stop(timeout=120)


def complete(url: str, prompt: str, stream: bool = False, max_tokens: int = 12) -> dict:
    body = {"model": "glm4-test", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["choices"][0]
    text, events = "", []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    return {"text": text, "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}


def replica_series(url: str, name: str) -> dict[str, float]:
    out = {}
    for line in without_model_name(httpx.get(url + "/metrics", timeout=10).text).splitlines():
        m = re.fullmatch(rf'glm4serve:{name}{{replica="([^"]+)"}} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


SETTLE_S = 3.0  # > two report periods: a report snapshotted under load and still in flight has landed


def settled_view(url: str, timeout: float = 60) -> dict[str, dict[str, float]]:
    """Each series by replica, once both replicas report no request and nothing has changed for
    SETTLE_S. The board lags the engines: under load a replica's reports arrive late, each a snapshot
    from when it was sent, so one read can show requests long finished, or nothing at all."""
    names = ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "prefix_cache_queries_total")
    deadline, since, last = time.monotonic() + timeout, None, None
    while True:
        view = {name: replica_series(url, name) for name in names}
        idle = all(len(v) == 2 for v in view.values()) and not any(
            view["num_requests_running"].values()) and not any(view["num_requests_waiting"].values())
        if not idle or view != last:
            since, last = time.monotonic(), view
        elif time.monotonic() - since >= SETTLE_S:
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.25)


def test_a_repeated_prompt_goes_back_to_the_replica_that_cached_it(replicated):
    """The prefix-affinity router: every repeat of a prompt of two full KV blocks reads them from the
    cache (a repeat sent to the other replica would not: one chance in two each time)."""
    body = {"model": "glm4-test", "prompt": list(range(300, 340)), "max_tokens": 1, "temperature": 0}
    cached = [httpx.post(replicated.url + "/v1/completions", json=body, timeout=60).json()["usage"]
              ["prompt_tokens_details"]["cached_tokens"] for _ in range(6)]
    assert cached == [0] + [32] * 5


def test_the_router_reads_the_hashes_of_any_copy_of_the_request_class():
    """Ray Serve loads cluster.py more than once in one process: isinstance against this module's
    EngineRequest fails for requests made with another copy, so the router reads the hashes by duck typing
    and every copy's prompts are routed by prefix."""
    from glm4serve.cluster import _block_hashes

    class Foreign:  # another copy of EngineRequest, as far as isinstance can tell
        block_hashes = [b"h0", b"h1"]

    class Pending:
        args = (Foreign(),)

    assert _block_hashes(Pending()) == [b"h0", b"h1"]
    assert _block_hashes(None) == [] and _block_hashes(type("P", (), {"args": ()})()) == []


class FakeReplicaStream:
    """What a Serve handle's streaming call gives: outputs to iterate (then `error`, if any), and cancel()."""

    def __init__(self, outputs, error: Exception | None = None):
        self.outputs, self.error, self.cancelled = list(outputs), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.outputs:
            return self.outputs.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


def replica_client_over(stream: FakeReplicaStream):
    from types import SimpleNamespace

    from glm4serve.api.settings import ServerSettings
    from glm4serve.cluster import ReplicaClient
    from tests.api_fakes import small_tokenizer

    generate = SimpleNamespace(remote=lambda request: stream)
    replicas = SimpleNamespace(options=lambda stream: SimpleNamespace(generate=generate))
    return ReplicaClient(replicas, None, ServerSettings(), small_tokenizer(), 4096)


def test_a_stream_left_before_its_end_is_cancelled_on_its_replica():
    """The server's deadline closes the stream and then aborts: the replica must stop all the same."""
    import asyncio

    from glm4serve.engine.types import Output, SamplingParams

    async def run(take: int | None, outputs) -> bool:
        stream = FakeReplicaStream(outputs)
        gen = replica_client_over(stream).generate([1, 2, 3], SamplingParams(max_tokens=5), "r")
        if take is None:
            assert [out async for out in gen] == outputs
        else:
            for _ in range(take):
                await anext(gen)
            await gen.aclose()
        return stream.cancelled

    step = Output("r", 0, [7], "a")
    last = Output("r", 0, [7], "a", finish_reason="length")
    assert asyncio.run(run(1, [step, step, last]))  # left mid-way
    assert not asyncio.run(run(None, [step, step, last]))  # read to its end


def test_the_engines_own_errors_cross_from_a_replica_as_they_are():
    """Ray raises a replica's exception as a RayTaskError whose text is the replica's traceback; the API maps the
    engine's ConstraintError to a 400 and its refusals (ValueError) too, so they must arrive as themselves."""
    import asyncio

    from ray.exceptions import RayTaskError

    from glm4serve.engine.types import ConstraintError, EngineError, SamplingParams

    async def error_of(cause: Exception) -> Exception:
        error = RayTaskError("handle_request", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
        stream = FakeReplicaStream([], error)
        with pytest.raises(Exception) as raised:
            async for _ in replica_client_over(stream).generate([1, 2, 3], SamplingParams(max_tokens=5), "r"):
                pass
        return raised.value

    for cause in (ConstraintError("request r failed: no token fits"), ValueError("prompt too long")):
        got = asyncio.run(error_of(cause))
        assert type(got) is type(cause) and str(got) == str(cause) and "Traceback" not in str(got)
    other = asyncio.run(error_of(KeyError("oops")))
    assert type(other) is EngineError and "KeyError" in str(other) and "Traceback" not in str(other)


def test_a_constraint_that_leaves_no_token_is_a_400_through_the_replicas(replicated, checkpoint):
    from glm4serve.model.tokenizer import Tokenizer

    eos = Tokenizer.from_dir(checkpoint).eos_token_id  # a stop token, held back until min_tokens: nothing is left
    body = {"model": "glm4-test", "prompt": "x", "max_tokens": 5, "min_tokens": 3, "allowed_token_ids": [eos]}
    r = httpx.post(replicated.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "Traceback" not in r.text and "ray::" not in r.text


def test_health_counts_the_replicas_and_metrics_label_them(replicated):
    health = httpx.get(replicated.url + "/health").json()
    assert health == {"status": "ok", "replicas_up": 2, "replicas": 2}
    assert len(replica_series(replicated.url, "kv_cache_blocks_total")) == 2
    assert len(replica_series(replicated.url, "iteration_tokens_total_count")) == 2


def test_greedy_outputs_equal_the_single_process_servers(replicated, checkpoint):
    single = ServerProcess(checkpoint, "--served-model-name", "glm4-test").wait_healthy()
    try:
        want = [complete(single.url, p)["text"] for p in PROMPTS]
    finally:
        single.stop()
    assert [complete(replicated.url, p)["text"] for p in PROMPTS] == want
    assert [complete(replicated.url, p, stream=True)["text"] for p in PROMPTS] == want


def test_24_concurrent_mixed_requests_all_succeed_on_both_replicas(replicated):
    before = settled_view(replicated.url)["prefix_cache_queries_total"]
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]} {i}", i % 2 == 0) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda job: complete(replicated.url, job[0], stream=job[1], max_tokens=24), jobs))
    assert all(g["finish_reason"] == "length" for g in got)
    after = settled_view(replicated.url)  # a replica's last report can land seconds after its last reply
    served = [r for r, n in after["prefix_cache_queries_total"].items() if n > before.get(r, 0)]
    assert len(served) == 2, (before, after)  # both replicas took prompts
    assert not any(after["kv_cache_blocks_used"].values())  # every block back


def replica_pid(name: str) -> int:
    """A replica's process, from Serve's controller log (which names it when it starts)."""
    for f in Path("/tmp/ray").glob("session_*/logs/serve/controller_*.log"):
        m = re.search(rf"Replica\(id='{name}', deployment='EngineReplica'.*?\(PID: (\d+)\)", f.read_text())
        if m:
            return int(m.group(1))
    raise AssertionError(f"no PID for replica {name}")


def test_a_killed_replica_fails_its_streams_and_comes_back(replicated):
    url = replicated.url
    queried = settled_view(url)["prefix_cache_queries_total"]  # from here on, only ours changes them
    body = {"model": "glm4-test", "prompt": "a long story", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):  # the request is running
            pass
        deadline = time.monotonic() + 30  # until the stats board has heard of it (a report a second)
        while True:
            admitted = {r_ for r_, v in replica_series(url, "prefix_cache_queries_total").items() if v > queried[r_]}
            if admitted:
                break
            assert time.monotonic() < deadline, "no replica reports the request admitted"
            time.sleep(0.2)
        assert len(admitted) == 1, admitted
        (victim,) = admitted
        os.kill(replica_pid(victim), signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][6:]), rest[-2:]
    assert complete(url, "still served")["finish_reason"] == "length"  # the other replica goes on
    deadline = time.monotonic() + 90
    while True:
        health = httpx.get(url + "/health").json()
        if health.get("replicas_up") == 2 and victim not in replica_series(url, "kv_cache_blocks_total"):
            break  # a new replica, under a new name
        assert time.monotonic() < deadline, health
        time.sleep(1)


def test_sigterm_lets_a_stream_finish_then_exits_0(checkpoint):
    s = all_replicas_up(ServerProcess(checkpoint, "--served-model-name", "glm4-test", "--num-replicas", "2",
                                      "--graceful-shutdown-seconds", "60").wait_healthy(timeout=240))
    body = {"model": "glm4-test", "prompt": "drain me", "max_tokens": 150, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=120) == 0
    s.log.close()
