"""Operations guards in process (the real engine over a scripted model runner): request limits (400),
body size (413),
admission (429 with Retry-After), drain (503), CORS, the per-request deadline (408 / error
event) and the metrics they feed."""

from __future__ import annotations

import re
import signal
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from glm4serve.api.shutdown import DrainingServer
from glm4serve.engine.types import EngineError, SamplingParams
from server_proc import without_model_name
from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    engine_of,
    make_app,
    shutdown_engines,
    sse_json,
    wait_idle,
)

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "t{}"}}


def envelope(r, status: int, type_: str, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return err


def metric(client: TestClient, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", without_model_name(client.get("/metrics").text), re.M)
    return float(m.group(1)) if m else 0.0


def tools(k: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"t{i}"}} for i in range(k)]


LIMITS = dict(max_messages=3, max_n=2, max_tools=2, max_stop=2, max_tokens_limit=8, max_prompts=2)

# (route, body at the limit, body one past it, param named in the 400)
CASES = [
    ("/v1/chat/completions", {"messages": HI * 3}, {"messages": HI * 4}, "messages"),
    ("/v1/chat/completions", {"messages": HI, "n": 2}, {"messages": HI, "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": HI, "tools": tools(2)}, {"messages": HI, "tools": tools(3)}, "tools"),
    ("/v1/chat/completions", {"messages": HI, "stop": ["a", "b"]}, {"messages": HI, "stop": ["a", "b", "c"]},
     "stop"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 8}, {"messages": HI, "max_tokens": 9}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 8},
     {"messages": HI, "max_completion_tokens": 9}, "max_tokens"),
    ("/v1/completions", {"prompt": ["a", "b"]}, {"prompt": ["a", "b", "c"]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "n": 2}, {"prompt": "a", "n": 3}, "n"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8}, {"prompt": "a", "max_tokens": 9}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "stop": "x"}, {"prompt": "a", "stop": ["x", "y", "z"]}, "stop"),
]


@pytest.mark.parametrize("route,ok,over,param", CASES)
def test_request_limits(route, ok, over, param):
    client = TestClient(make_app(**LIMITS))
    assert client.post(route, json=ok).status_code == 200
    err = envelope(client.post(route, json=over), 400, "invalid_request_error", param)
    assert "limit" in err["message"]


def test_default_limits_are_generous_but_present():
    client = TestClient(make_app(max_model_len=100_000))
    assert client.post("/v1/chat/completions", json={"messages": HI, "n": 16}).status_code == 200
    envelope(client.post("/v1/chat/completions", json={"messages": HI, "n": 17}), 400, "invalid_request_error", "n")
    assert client.post("/v1/chat/completions", json={"messages": HI, "tools": tools(128)}).status_code == 200
    envelope(client.post("/v1/chat/completions", json={"messages": HI, "tools": tools(129)}), 400,
             "invalid_request_error", "tools")


def test_max_tokens_limit_also_caps_the_default():
    app = make_app(max_tokens_limit=5, max_model_len=4096)
    client = TestClient(app)
    assert client.post("/v1/chat/completions", json={"messages": HI}).status_code == 200
    assert engine_of(app).calls[-1].params.max_tokens == 5
    client.post("/v1/completions", json={"prompt": "a"})
    assert engine_of(app).calls[-1].params.max_tokens == 5  # the completions default of 16, lowered
    uncapped = make_app(max_model_len=4096)
    TestClient(uncapped).post("/v1/chat/completions", json={"messages": HI})
    call = engine_of(uncapped).calls[-1]
    assert call.params.max_tokens == 4096 - len(call.prompt_ids)


def test_body_size_limit_413_by_header_and_by_counting():
    app = make_app(max_request_body_bytes="1KiB")
    engine = engine_of(app)
    client = TestClient(app)
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    err = envelope(client.post("/v1/chat/completions", json=big), 413, "invalid_request_error")
    assert "1024" in err["message"]

    def chunks():  # no Content-Length: the middleware counts the bytes as they arrive
        body = b'{"messages": [{"role": "user", "content": "' + b"y" * 2000 + b'"}]}'
        for i in range(0, len(body), 256):
            yield body[i : i + 256]

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    envelope(r, 413, "invalid_request_error")
    assert engine.calls == []  # neither reached the engine
    assert metric(client, 'glm4serve:request_rejected_total{reason="body_too_large"}') == 2
    small = client.post("/v1/chat/completions", json={"messages": HI})
    assert small.status_code == 200 and len(engine.calls) == 1


def test_admission_429_with_retry_after_when_full():
    app = make_app(max_num_seqs=2, max_waiting_requests=1)
    engine = engine_of(app)
    assert engine.engine.scheduler.cfg.max_num_seqs == 2  # the engine's setting and the gate's
    client = TestClient(app)
    gate = app.state.gate
    assert gate.capacity == 3
    gate.num_generating = 3  # three requests in flight (running + queued)
    for route, body in (("/v1/chat/completions", {"messages": HI, "stream": True}),
                        ("/v1/completions", {"prompt": "a"}), ("/v1/responses", {"input": "a"}),
                        ("/invocations", {"prompt": "a"})):
        r = client.post(route, json=body)
        err = envelope(r, 429, "rate_limit_error")
        assert err["code"] == "queue_full" and r.headers["retry-after"] == "1"
    r = client.post("/v1/messages", json={"max_tokens": 2, "messages": HI})  # in Anthropic's envelope
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    assert engine.calls == []
    # only generation is admitted against the queue: the rest of the API stays up
    assert client.get("/v1/models").status_code == 200 and client.get("/health").status_code == 200
    assert metric(client, 'glm4serve:request_rejected_total{reason="queue_full"}') == 5  # with /v1/messages
    assert metric(client, "glm4serve:num_requests_admitted") == 3
    gate.num_generating = 2
    assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 200
    assert gate.num_generating == 2 and gate.num_in_flight == 0  # what the request took, it gave back


def test_in_flight_counts_return_to_zero_after_errors_and_streams():
    app = make_app(max_n=1)
    client = TestClient(app)
    client.post("/v1/chat/completions", json={"messages": HI, "n": 2})  # 400 from the limits
    client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    client.post("/v1/chat/completions", json={"messages": HI, "stream": True})
    client.post("/v1/responses", json={"input": "hi", "stream": True})
    client.post("/v1/responses", json={"input": []})  # 400
    client.post("/tokenize", json={"prompt": "hi"})
    assert (app.state.gate.num_generating, app.state.gate.num_in_flight) == (0, 0)


def test_draining_refuses_new_work_but_probes_and_scrapes_answer():
    app = make_app()
    engine = engine_of(app)
    client = TestClient(app)
    app.state.gate.draining = True
    for r in (client.post("/v1/chat/completions", json={"messages": HI}), client.get("/v1/models"),
              client.post("/tokenize", json={"prompt": "hi"})):
        envelope(r, 503, "service_unavailable_error")
        assert r.headers["retry-after"] == "5"
    r = client.post("/v1/messages", json={"max_tokens": 2, "messages": HI})  # in Anthropic's envelope
    assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    envelope(client.get("/health"), 503, "service_unavailable_error")
    assert client.get("/ping").status_code == 200 and client.get("/metrics").status_code == 200
    assert engine.calls == []
    assert metric(client, 'glm4serve:request_rejected_total{reason="draining"}') == 4


def test_cors_off_by_default_and_configurable():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    off = TestClient(make_app())
    assert "access-control-allow-origin" not in off.options("/v1/chat/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in off.get("/v1/models", headers={"Origin": "https://app.example"}).headers

    on = TestClient(make_app(cors_allowed_origins="https://app.example", api_key="k"))
    r = on.options("/v1/chat/completions", headers=preflight)  # preflights carry no API key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = on.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = on.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in other.headers
    # errors are readable by the allowed page too
    r = on.get("/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_deadline_whole_reply_is_408_and_the_engine_request_is_aborted():
    app = make_app(replies=["word " * 200], step_delay=0.02, request_timeout_seconds=0.2)
    engine = engine_of(app)
    client = TestClient(app)
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 150})
    assert time.monotonic() - t0 < 2.0
    err = envelope(r, 408, "timeout_error")
    assert err["code"] == "request_timeout" and "0.2 seconds" in err["message"]
    (call,) = engine.calls
    assert call.request_id in engine.aborted
    wait_idle(engine)  # nothing left in the engine, no KV block leaked
    assert metric(client, "glm4serve:request_timeout_total") == 1
    assert metric(client, 'glm4serve:request_success_total{finished_reason="abort"}') == 1


def test_deadline_stream_ends_with_an_error_event():
    app = make_app(replies=["word " * 200], step_delay=0.02, request_timeout_seconds=0.2)
    engine = engine_of(app)
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 150, "stream": True})
    assert r.status_code == 200
    events = sse_json(r.text)
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-1])
    assert events[-1]["error"]["code"] == "request_timeout"
    assert all(e.get("choices", [{}])[0].get("finish_reason") is None for e in events[:-1])
    assert engine.calls[0].request_id in engine.aborted
    wait_idle(engine)


def test_a_request_within_its_deadline_is_untouched():
    app = make_app(replies=["\nshort"], step_delay=0.01, request_timeout_seconds=5)
    engine = engine_of(app)
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "short"
    assert engine.aborted == []


# --- the drain state machine (api/shutdown.py), without sockets -------------------------------


async def test_draining_server_waits_for_in_flight_requests_then_exits():
    app = make_app()
    gate = app.state.gate
    server = DrainingServer(uvicorn.Config(app), gate, grace=30)
    gate.num_in_flight = 2
    server.handle_exit(signal.SIGTERM, None)
    assert gate.draining and not server.should_exit
    assert await server.on_tick(1) is False  # two still in flight
    gate.num_in_flight = 0
    assert await server.on_tick(2) is True and server.should_exit
    assert server._captured_signals == []  # not re-raised after shutdown: the process exits 0


async def test_draining_server_gives_up_at_the_grace_deadline_and_a_second_signal_forces():
    app = make_app()
    gate = app.state.gate
    server = DrainingServer(uvicorn.Config(app), gate, grace=0.05)
    gate.num_in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert await server.on_tick(1) is False
    time.sleep(0.06)
    assert await server.on_tick(2) is True  # cut: the grace is over

    impatient = DrainingServer(uvicorn.Config(app), gate, grace=30)
    impatient.handle_exit(signal.SIGTERM, None)
    impatient.handle_exit(signal.SIGTERM, None)  # second signal: uvicorn's own exit
    assert impatient.should_exit and impatient._captured_signals == [signal.SIGTERM]


async def test_at_the_grace_deadline_the_engine_ends_what_is_in_flight_as_a_failed_request():
    """Not a cut connection: the engine is stopped first, so a stream in flight gets an error event
    naming the shutdown, before uvicorn's own cut."""
    app = make_app(replies=["x" * 1000], step_delay=0.01)
    engine = engine_of(app)
    stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=1000), request_id="late")
    await anext(stream)
    server = DrainingServer(uvicorn.Config(app), app.state.gate, grace=0.0, engine=engine)
    app.state.gate.num_in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert await server.on_tick(1) is True and server.exit_code == 0
    with pytest.raises(EngineError, match="the server shut down before this request finished"):
        async for _ in stream:
            pass
    assert not engine.is_alive and not engine.died


async def test_an_engine_loop_that_dies_takes_the_server_down_with_status_1():
    app = make_app(replies=["x" * 1000], step_delay=0.01)
    engine = engine_of(app)
    server = DrainingServer(uvicorn.Config(app), app.state.gate, grace=30, engine=engine)
    assert await server.on_tick(1) is False and not server.should_exit  # alive: serving on
    stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=1000), request_id="x")
    await anext(stream)

    def broken_step():
        raise RuntimeError("scheduler bug")

    engine.engine.step = broken_step
    with pytest.raises(EngineError, match="died"):
        async for _ in stream:
            pass
    assert await server.on_tick(2) is True
    assert server.exit_code == 1 and app.state.gate.draining


def test_cli_flags_for_the_operations_settings(monkeypatch):
    from glm4serve import cli

    for key in ("GLM4SERVE_CONFIG", "GLM4SERVE_CORS_ALLOWED_ORIGINS"):
        monkeypatch.delenv(key, raising=False)
    args = cli.build_parser().parse_args([
        "serve", "--max-waiting-requests", "3", "--request-timeout-seconds", "2.5", "--max-request-body-bytes", "1MiB",
        "--max-messages", "9", "--max-n", "4", "--max-prompts", "5", "--max-tokens-limit", "100", "--max-tools", "6",
        "--max-stop", "7", "--cors-allowed-origins", "https://a.example, https://b.example"])
    s = cli.settings_from_args(args)
    assert (s.max_waiting_requests, s.request_timeout_seconds, s.max_request_body_bytes) == (3, 2.5, 1 << 20)
    assert (s.max_messages, s.max_n, s.max_prompts, s.max_tokens_limit, s.max_tools, s.max_stop) == (9, 4, 5, 100, 6, 7)
    assert s.cors_allowed_origins == ["https://a.example", "https://b.example"]
