"""Bad requests get 4xx OpenAI error envelopes (never FastAPI's 422, never a 500), and the
server keeps serving afterwards."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import MODEL, engine_of, make_app, shutdown_engines, wait_idle  # noqa: F401 - autouse

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_time"}}

BAD_CHAT = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "hologram", "hologram": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": [{"type": "refusal"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    ({"messages": HI, "n": 0}, "n"),
    ({"messages": HI, "temperature": -0.1}, "temperature"),
    ({"messages": HI, "temperature": 2.5}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "top_p": 1.5}, "top_p"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": HI, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": HI, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": HI, "use_beam_search": True}, "use_beam_search"),
    ({"messages": HI, "best_of": 3}, "best_of"),
    ({"messages": HI, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": HI, "functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"messages": HI, "function_call": "auto"}, "function_call"),
    ({"messages": HI, "chat_template_kwargs": {"chat_template": "{{ messages }}"}}, "chat_template"),
    ({"messages": HI, "tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ({"messages": HI, "tools": [TOOL, TOOL]}, "tools"),
    ({"messages": HI, "max_tokens": -1}, "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": HI, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": HI, "stop": [""]}, "stop"),
    ({"messages": HI, "stop": 5}, "stop"),
    ({"messages": HI, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"-5": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"\u0661": 1}}, "logit_bias"),  # ARABIC-INDIC DIGIT ONE: int() reads it as 1
    ({"messages": HI, "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # SUPERSCRIPT TWO: isdigit() but not int()
    ({"messages": HI, "logit_bias": {"5": 200}}, "logit_bias.5"),
    ({"messages": HI, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": HI, "stop_token_ids": [999999]}, "stop_token_ids"),
    ({"messages": HI, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"messages": HI, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"messages": HI, "stream": "maybe"}, "stream"),
    # numbers are numbers, as OpenAI checks them: no booleans, strings or decimals for integers
    ({"messages": HI, "max_tokens": True}, "max_tokens"),
    ({"messages": HI, "n": True}, "n"),
    ({"messages": HI, "max_tokens": "5"}, "max_tokens"),
    ({"messages": HI, "max_tokens": 5.0}, "max_tokens"),
    ({"messages": HI, "temperature": "0.5"}, "temperature"),
    ({"messages": HI, "stop_token_ids": [True]}, "stop_token_ids.0"),
    ({"messages": HI, "seed": 2**63}, "seed"),  # int64, as vLLM takes it
    ({"messages": HI, "seed": -(2**63) - 1}, "seed"),
    ({"messages": HI, "prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    ({"messages": HI, "tool_choice": {"type": "function"}}, "tool_choice.function"),  # no model's name in it
]

BAD_COMPLETIONS = [
    ({}, "prompt"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),  # an integer (how many alternatives), not a flag
    ({"prompt": [1, True]}, "prompt.0"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),  # as vLLM
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),  # vLLM's "the whole vocabulary"
    ({"prompt": "x", "n": -2}, "n"),
]


@pytest.fixture(scope="module")
def client():
    client = TestClient(make_app(replies=["\nok"], max_model_len=64))
    yield client
    engine_of(client.app).shutdown()


@pytest.fixture
def engine(client):
    return engine_of(client.app)


def assert_envelope(r, status: int, type_: str, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p + str(i) for i, (_, p) in enumerate(BAD_CHAT)])
def test_bad_chat_request_is_400(client, engine, body, param):
    before = len(engine.calls)
    assert_envelope(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error", param)
    assert len(engine.calls) == before  # rejected before reaching the engine


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[p + str(i) for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_request_is_400(client, body, param):
    assert_envelope(client.post("/v1/completions", json=body), 400, "invalid_request_error", param)


@pytest.mark.parametrize("raw", [b'{"messages": [', b"[1, 2]", b"", b"null", b"\xff\xfe"])
def test_malformed_json_is_400(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(r, 400, "invalid_request_error")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_400_saying_so(client, number):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % number
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert "finite number" in assert_envelope(r, 400, "invalid_request_error", "temperature")["message"]


@pytest.mark.parametrize("kind", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_body_not_sent_as_json_is_400_saying_so(client, kind):
    body = json.dumps({"messages": HI})
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": kind} if kind else {})
    message = assert_envelope(r, 400, "invalid_request_error")["message"]
    assert "Content-Type: application/json" in message and (repr(kind) if kind else "no Content-Type") in message


def _nested(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


LONE = "x\ud800y"  # valid JSON ("\\ud800"), not Unicode: no UTF-8 encoder takes it
DEEP_FORMAT = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(40)}}
DEEP_TOOL = {"type": "function", "function": {"name": "f", "parameters": _nested(40)}}
UNFIT = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": LONE}}]}, *HI]},
     "messages.0.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
        "name": "f", "description": LONE}}]}, "tools.0.function.description"),
    ("/v1/chat/completions", {"messages": HI, "stop": ["ok", LONE]}, "stop.1"),
    ("/v1/chat/completions", {"messages": HI, "user": LONE}, "user"),
    ("/v1/chat/completions", {"messages": HI, "model": LONE}, "model"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {"k": LONE}}, "chat_template_kwargs.k"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {LONE: 1}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": HI, "response_format": DEEP_FORMAT},
     "response_format.json_schema.schema.properties.a.properties"),
    ("/v1/chat/completions", {"messages": HI, "tools": [DEEP_TOOL], "tool_choice": "required"},
     "tools.0.function.parameters.properties.a"),
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", LONE]}, "prompt.1"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
]


@pytest.mark.parametrize("route,body,param", UNFIT, ids=[p for _, _, p in UNFIT])
def test_lone_surrogates_and_deep_nesting_are_400(client, engine, route, body, param):
    before = len(engine.calls)
    r = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    err = assert_envelope(r, 400, "invalid_request_error", param)
    assert ("surrogate" in err["message"]) != ("nested" in err["message"])
    assert len(engine.calls) == before


def test_deep_but_reasonable_schemas_are_served(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _nested(25)}}
    assert client.post("/v1/chat/completions", json={"messages": HI, "response_format": fmt}).status_code == 200
    # surrogate pairs are fine: json.dumps escapes an emoji as one
    assert client.post("/v1/chat/completions", content=json.dumps({"messages": [{"role": "user", "content": "hi 😀"}]}),
                       headers={"content-type": "application/json"}).status_code == 200


def test_an_error_message_echoing_a_lone_surrogate_still_renders():
    from glm4serve.api.errors import APIError

    r = APIError(404, "The model `\ud800` does not exist.").response()
    assert json.loads(r.body)["error"]["message"] == "The model `\\ud800` does not exist."


def test_server_still_healthy_after_bad_requests(client):
    for body, _ in BAD_CHAT:
        client.post("/v1/chat/completions", json=body)
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


def test_min_tokens_past_the_default_or_capped_max_tokens_is_400():
    for app, body in [(make_app(max_model_len=128), {}), (make_app(max_tokens_limit=32), {}),
                      (make_app(max_tokens_limit=32), {"max_tokens": 100})]:
        client = TestClient(app)
        for route, extra in [("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})]:
            r = client.post(route, json={**extra, **body, "min_tokens": 200})
            assert_envelope(r, 400, "invalid_request_error", "min_tokens")
        assert engine_of(app).calls == []


def test_unknown_model_is_404(client):
    err = assert_envelope(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": HI}),
                          404, "invalid_request_error", "model", "model_not_found")
    assert "gpt-4" in err["message"]
    assert_envelope(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404,
                    "invalid_request_error", "model", "model_not_found")
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI}).status_code == 200


def test_context_length_exceeded(client, engine):
    long = [{"role": "user", "content": "word " * 100}]
    assert_envelope(client.post("/v1/chat/completions", json={"messages": long}), 400,
                    "invalid_request_error", code="context_length_exceeded")
    # fits alone, but not with the requested max_tokens (max_model_len is 64)
    err = assert_envelope(client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 60}), 400,
                          "invalid_request_error", code="context_length_exceeded")
    assert "64" in err["message"]
    assert_envelope(client.post("/v1/completions", json={"prompt": list(range(60)), "max_tokens": 10}), 400,
                    "invalid_request_error", "prompt", "context_length_exceeded")
    assert client.post("/v1/completions", json={"prompt": list(range(54)), "max_tokens": 10}).status_code == 200


def test_unknown_route_and_wrong_method(client):
    assert_envelope(client.get("/v1/nothing"), 404, "not_found_error")
    assert_envelope(client.get("/v1/chat/completions"), 405, "invalid_request_error")


def test_api_key_guards_every_route_but_the_probes_and_metrics():
    client = TestClient(make_app(replies=["\nok"], api_key="sekret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        assert_envelope(client.post("/v1/chat/completions", json={"messages": HI}, headers=headers), 401,
                        "authentication_error")
        assert_envelope(client.get("/v1/models", headers=headers), 401, "authentication_error")
    # auth is checked before the body: a bad body without a key is still 401, one that is not JSON too
    assert client.post("/v1/chat/completions", json={}).status_code == 401
    not_json = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope(not_json, 401, "authentication_error")
    assert client.get("/v1", headers={}).status_code == 401
    ok = {"Authorization": "Bearer sekret"}
    assert client.post("/v1/chat/completions", json={"messages": HI}, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200
    for path in ("/health", "/ping", "/metrics", "/version"):
        assert client.get(path).status_code == 200
    # routes outside /v1 too: the tokenizer and its chat template, the API's description, unknown paths
    for method, path, body in (("post", "/tokenize", {"prompt": "hi"}), ("post", "/detokenize", {"tokens": [1]}),
                               ("get", "/openapi.json", None), ("get", "/docs", None), ("get", "/nothing", None)):
        assert_envelope(client.request(method, path, json=body), 401, "authentication_error")
        if path != "/nothing":
            assert client.request(method, path, json=body, headers=ok).status_code == 200, path


def test_unexpected_engine_exception_is_500_and_server_survives():
    app = make_app(fail_after_steps=0)  # every forward of the model raises
    client = TestClient(app, raise_server_exceptions=False)
    assert_envelope(client.post("/v1/chat/completions", json={"messages": HI}), 500, "server_error")
    assert_envelope(client.post("/v1/completions", json={"prompt": "x"}), 500, "server_error")
    engine = engine_of(app)
    wait_idle(engine)
    engine.runner.fail_after_steps = None
    assert client.post("/v1/chat/completions", json={"messages": HI}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_exception_in_a_route_is_answered_not_raised_to_the_server(stream):
    """Starlette's last-resort handler re-raises after its 500, and uvicorn then drops the
    connection under a keep-alive client's next request; ours keeps the exception in the app."""
    app = make_app()

    async def broken_encode(text):
        raise RuntimeError("tokenizer broke")

    app.state.serving.encode = broken_encode
    client = TestClient(app)  # raise_server_exceptions: an exception leaving the app fails the test
    assert_envelope(client.post("/v1/chat/completions", json={"messages": HI, "stream": stream}), 500, "server_error")
    assert_envelope(client.post("/tokenize", json={"prompt": "x"}), 500, "server_error")
    assert client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).status_code == 200


def test_engine_not_ready_is_503():
    app = make_app()
    engine_of(app).shutdown()  # the engine loop has stopped
    r = TestClient(app).post("/v1/chat/completions", json={"messages": HI})
    assert_envelope(r, 503, "service_unavailable_error")
    assert r.headers["retry-after"]
    assert engine_of(app).calls == []


# What only the engine refuses: a priority needs the priority policy, which the engine checks.
ENGINE_REFUSED = [
    ("/v1/chat/completions", {"messages": HI, "priority": 1}),
    ("/v1/completions", {"prompt": "x", "priority": 1}),
    ("/v1/completions", {"prompt": ["x", "y"], "priority": 1}),
]


@pytest.mark.parametrize("route,body", ENGINE_REFUSED)
def test_a_stream_only_the_engine_refuses_is_400_not_an_error_event(route, body):
    client = TestClient(make_app())
    r = client.post(route, json={**body, "stream": True})
    err = assert_envelope(r, 400, "invalid_request_error")
    assert "--scheduling-policy priority" in err["message"]
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_request_leaves_nothing_in_the_engine(stream):
    app = make_app()
    client = TestClient(app)
    for route, body in ENGINE_REFUSED:
        assert client.post(route, json={**body, "stream": stream}).status_code == 400
    engine = engine_of(app)
    assert engine.calls == [] and engine.aborted == []  # refused before any stream was opened
    wait_idle(engine)  # no request, every KV block free
    assert engine.runner.num_steps == 0
    r = client.post("/v1/chat/completions", json={"messages": HI, "n": 2, "stream": stream})
    assert r.status_code == 200
