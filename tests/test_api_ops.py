"""Operations routes (/v1/models, /health, /ping, /version, /tokenize, /detokenize, /metrics)
and client disconnects aborting the engine request."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import warnings

from fastapi.testclient import TestClient

from server_proc import without_model_name
from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    engine_of,
    make_app,
    shutdown_engines,
    small_tokenizer,
    wait_idle,
)

HI = [{"role": "user", "content": "hi"}]


def test_models_lists_the_served_model():
    body = TestClient(make_app(max_model_len=1234)).get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 1234
    assert isinstance(card["created"], int) and card["owned_by"]


def test_a_model_served_under_several_names_answers_to_each_and_replies_with_the_first():
    """vLLM's --served-model-name a b."""
    client = TestClient(make_app(model_name="glm-4", served_model_name="glm-4 THUDM/glm-4-9b-chat"))
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["glm-4", "THUDM/glm-4-9b-chat"]
    for name in ("glm-4", "THUDM/glm-4-9b-chat"):
        r = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "glm-4"
    assert client.post("/v1/completions", json={"model": "glm", "prompt": "hi"}).status_code == 404


def test_a_model_is_retrieved_by_its_id_even_with_a_slash():
    client = TestClient(make_app(max_model_len=1234))
    [card] = client.get("/v1/models").json()["data"]
    assert client.get(f"/v1/models/{MODEL}").json() == card
    for unknown in ["nope", "THUDM/nope", ""]:
        r = client.get(f"/v1/models/{unknown}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    app = make_app(model_name="THUDM/glm-4-9b-chat")
    assert TestClient(app).get("/v1/models/THUDM/glm-4-9b-chat").json()["id"] == "THUDM/glm-4-9b-chat"


def test_health_follows_the_engine_and_ping_is_always_up():
    app = make_app()
    engine = engine_of(app)
    app.state.serving.engine = None  # still loading
    client = TestClient(app)
    assert client.get("/health").status_code == 503 and client.head("/health").status_code == 503
    assert client.get("/ping").status_code == 200
    app.state.serving.engine = engine  # loaded
    assert client.get("/health").status_code == 200
    head = client.head("/health")  # probes that read the status alone
    assert head.status_code == 200 and head.content == b"" and client.head("/ping").status_code == 200
    engine.shutdown()  # the engine loop stopped
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    assert client.get("/ping").status_code == 200


def test_the_openapi_schema_names_each_operation_once():
    """/openapi.json builds without FastAPI's duplicate-operation warning (GET and HEAD of /health and /ping share a
    function; HEAD stays out of the schema), every operation id its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = TestClient(make_app()).get("/openapi.json").json()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) and {"/health", "/ping"} <= schema["paths"].keys()
    assert set(schema["paths"]["/health"]) == {"get"}


def test_version():
    import glm4serve

    client = TestClient(make_app())
    assert client.get("/version").json() == {"version": glm4serve.__version__}


def test_tokenize_and_detokenize():
    tok = small_tokenizer()
    client = TestClient(make_app(max_model_len=999))
    body = client.post("/tokenize", json={"prompt": "hello world"}).json()
    prefix = [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]
    assert body["tokens"] == prefix + tok.encode("hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 999
    plain = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("hello world")
    chat = client.post("/tokenize", json={"messages": HI}).json()
    assert tok.decode(chat["tokens"]) == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert client.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": "hello world"}
    assert plain["token_strs"] is None
    strs = client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()["token_strs"]
    assert strs[:2] == ["[gMASK]", "<sop>"] and strs[2:] == [tok.decode([t]) for t in plain["tokens"]]
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", without_model_name(text), re.M)
    assert m, f"{name}{labels} missing"
    return float(m.group(1))


def test_metrics_names_and_movement():
    app = make_app(block_size=4)  # small blocks: a repeated prompt's first block is a prefix cache hit
    client = TestClient(app)
    engine = engine_of(app)
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    text = before.text
    # every series names the served model, as vLLM's: its dashboards select on model_name
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(f'model_name="{MODEL}"' in line for line in samples)
    # engine gauges and counters are read at scrape time: an idle engine, nothing seen yet
    assert metric(text, "glm4serve:num_requests_running") == 0
    assert metric(text, "glm4serve:num_requests_waiting") == 0
    assert metric(text, "glm4serve:kv_cache_usage_perc") == 0
    assert metric(text, "glm4serve:kv_cache_blocks_total") == engine.engine.pool.num_blocks == 4096 // 4
    assert metric(text, "glm4serve:num_preemptions_total") == 0
    assert metric(text, "glm4serve:prefix_cache_queries_total") == 0
    assert metric(text, "glm4serve:prefix_cache_hits_total") == 0
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
              "request_time_per_output_token_seconds", "request_max_num_generation_tokens", "request_params_n",
              "request_params_max_tokens", "iteration_tokens_total"):
        assert f"# TYPE glm4serve:{h} histogram" in text
    assert metric(text, "glm4serve:prompt_tokens_total") == 0
    assert metric(text, "glm4serve:generation_tokens_total") == 0

    client.post("/v1/chat/completions", json={"messages": HI})
    client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "stream": True})
    wait_idle(engine)
    text = client.get("/metrics").text
    prompt_len = len(engine.calls[0].prompt_ids)
    full = len(small_tokenizer().encode("\nHello there!")) + 1
    assert metric(text, "glm4serve:prompt_tokens_total") == 2 * prompt_len
    assert metric(text, "glm4serve:generation_tokens_total") == full + 2
    assert metric(text, "glm4serve:request_success_total", '{finished_reason="stop"}') == 1
    assert metric(text, "glm4serve:request_success_total", '{finished_reason="length"}') == 1
    assert metric(text, "glm4serve:time_to_first_token_seconds_count") == 2
    assert metric(text, "glm4serve:e2e_request_latency_seconds_count") == 2
    assert metric(text, "glm4serve:inter_token_latency_seconds_count") == (full - 1) + 1
    assert metric(text, "glm4serve:request_generation_tokens_sum") == full + 2
    assert metric(text, "glm4serve:request_max_num_generation_tokens_sum") == full + 2
    assert metric(text, "glm4serve:request_time_per_output_token_seconds_count") == 2  # both replies: 2+ tokens
    assert metric(text, "glm4serve:request_prefill_time_seconds_count") == 2
    assert metric(text, "glm4serve:request_params_max_tokens_sum") >= 2
    # both prompts were looked up; the second found the first's whole blocks before its last token
    assert metric(text, "glm4serve:prefix_cache_queries_total") == 2 * prompt_len
    assert metric(text, "glm4serve:prefix_cache_hits_total") == 4 * ((prompt_len - 1) // 4) > 0
    # every step counted by its tokens: two prompt steps (the second past its cached blocks), then one step a
    # token for each token fed back (all but each reply's last)
    hits = metric(text, "glm4serve:prefix_cache_hits_total")
    assert metric(text, "glm4serve:iteration_tokens_total_sum") == 2 * prompt_len - hits + (full - 1) + (2 - 1)
    assert metric(text, "glm4serve:iteration_tokens_total_bucket", '{le="1.0"}') == full
    assert metric(text, "glm4serve:iteration_tokens_total_count") == full + 2
    assert metric(text, "glm4serve:num_requests_running") == 0
    assert metric(text, "glm4serve:kv_cache_blocks_used") == 0

    # a request held in flight by a slow model shows in the gauges while it runs
    engine.runner.replies, engine.runner.step_delay = ["\n" + "word " * 50], 0.02
    statuses = []
    slow = threading.Thread(target=lambda: statuses.append(TestClient(app).post(
        "/v1/chat/completions", json={"messages": HI, "max_tokens": 40}).status_code))
    slow.start()
    deadline = time.monotonic() + 5
    while True:
        text = client.get("/metrics").text
        if metric(text, "glm4serve:num_requests_running") == 1:
            break
        assert time.monotonic() < deadline, "the slow request never showed as running"
        time.sleep(0.01)
    assert metric(text, "glm4serve:kv_cache_blocks_used") >= 1 and metric(text, "glm4serve:kv_cache_usage_perc") > 0
    slow.join(10)
    assert statuses == [200]
    wait_idle(engine)
    assert metric(client.get("/metrics").text, "glm4serve:num_requests_running") == 0


def test_a_requests_time_splits_into_queue_prefill_and_decode(monkeypatch):
    """vLLM's phase histograms, on a clock the test moves: queue + prefill = time to first token,
    prefill + decode = inference time; per-token time is each choice's own, over its tokens after the first."""
    from glm4serve.api import metrics as metrics_module
    from glm4serve.engine.types import Output

    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: clock[0])
    m = metrics_module.Metrics(lambda: None, MODEL)
    timing = m.start_request(n=2, max_tokens=50)

    def at(t, index, tokens, finish=None):
        clock[0] = 100.0 + t
        timing.on_output(Output("r", index, list(range(tokens)), "x" * tokens, finish_reason=finish,
                                num_prompt_tokens=7, queue_time=0.25))

    at(1.0, 0, 1)  # admitted at 0.25, first token at 1.0
    at(1.0, 1, 1)
    at(1.5, 0, 2)
    at(3.0, 0, 1, "length")  # choice 0: 4 tokens from 1.0 to 3.0
    at(4.0, 1, 1, "stop")  # choice 1: 2 tokens from 1.0 to 4.0
    timing.close()
    text = m.render().decode()

    def value(name):
        return metric(text, "glm4serve:" + name)

    assert value("time_to_first_token_seconds_sum") == 1.0 and value("request_queue_time_seconds_sum") == 0.25
    assert value("request_prefill_time_seconds_sum") == 0.75
    assert value("request_decode_time_seconds_sum") == 3.0  # first token (1.0) to the last of any choice (4.0)
    assert value("request_inference_time_seconds_sum") == 3.75
    assert value("e2e_request_latency_seconds_sum") == 4.0
    assert value("request_time_per_output_token_seconds_count") == 2
    assert value("request_time_per_output_token_seconds_sum") == (3.0 - 1.0) / 3 + (4.0 - 1.0) / 1
    assert value("request_max_num_generation_tokens_sum") == 4 and value("request_generation_tokens_sum") == 6
    assert value("request_params_n_sum") == 2 and value("request_params_max_tokens_sum") == 50


def test_each_choice_counts_once_by_how_it_finished():
    """A choice the API ended early counts as it told the client (stop), not by the engine's later 'abort' of it;
    choices left unfinished count as 'abort' (client gone, deadline), or 'error' when the engine failed them."""
    from glm4serve.api import metrics as metrics_module
    from glm4serve.engine.types import Output

    m = metrics_module.Metrics(lambda: None, MODEL)
    timing = m.start_request(n=3, max_tokens=50)
    timing.on_output(Output("r", 0, [1], "x", finish_reason="length"))
    timing.finish(1, "stop")  # ended by the API
    timing.on_output(Output("r", 1, [], "", finish_reason="abort"))  # the engine's end of it
    timing.close("error")  # choice 2 never finished
    timing.close("abort")  # once only
    text = m.render().decode()
    counts = {reason: metric(text, "glm4serve:request_success_total", f'{{finished_reason="{reason}"}}')
              for reason in ("length", "stop", "error")}
    assert counts == {"length": 1, "stop": 1, "error": 1}
    assert 'finished_reason="abort"' not in text


def test_two_apps_in_one_process_have_separate_metrics():
    a, b = (TestClient(make_app()) for _ in range(2))
    a.post("/v1/chat/completions", json={"messages": HI})
    assert metric(a.get("/metrics").text, "glm4serve:e2e_request_latency_seconds_count") == 1
    assert metric(b.get("/metrics").text, "glm4serve:e2e_request_latency_seconds_count") == 0


# ---- disconnects ----------------------------------------------------------------------------


async def call_then_disconnect(app, path: str, body: dict, hang_up_when) -> list[dict]:
    """Drive the ASGI app directly: send `body`, report http.disconnect once
    `hang_up_when(sent_messages)` is true; returns what the app sent."""
    sent: list[dict] = []
    gone = asyncio.Event()
    incoming = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if hang_up_when(sent):
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 5), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def data_events(sent) -> int:
    return sum(m.get("body", b"").count(b"data: ") for m in sent if m["type"] == "http.response.body")


async def test_stream_disconnect_aborts_the_engine_request():
    app = make_app(replies=["\n" + "word " * 200], step_delay=0.01)
    sent = await call_then_disconnect(app, "/v1/chat/completions", {"messages": HI, "stream": True},
                                      lambda s: data_events(s) >= 4)
    assert data_events(sent) < 50  # stopped long before the 200-word reply was done
    engine = engine_of(app)
    [call] = engine.calls
    assert call.request_id in engine.aborted
    await asyncio.to_thread(wait_idle, engine)  # nothing left in the engine, no KV block leaked
    assert engine.runner.num_steps < 50
    # the choice the client left counts as aborted, as vLLM counts it
    text = app.state.serving.metrics.render().decode()
    assert metric(text, "glm4serve:request_success_total", '{finished_reason="abort"}') == 1


async def test_whole_request_disconnect_message_cancels_generation():
    app = make_app(replies=["\n" + "word " * 200], step_delay=0.01)
    engine = engine_of(app)
    sent: list[dict] = []
    body = json.dumps({"messages": HI}).encode()
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        while engine.runner.num_steps == 0:  # the client hangs up while the reply is being generated
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.03)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    [call] = engine.calls
    assert call.request_id in engine.aborted and sent[0]["status"] == 499
    await asyncio.to_thread(wait_idle, engine)  # nothing left in the engine, no KV block leaked
    assert engine.runner.num_steps < 100
