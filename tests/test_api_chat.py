"""/v1/chat/completions against the scripted FakeEngine: wire format, whole and streamed."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import MODEL, FakeEngine, make_app, small_tokenizer, sse_events, sse_json

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine(small_tokenizer())


def client_for(engine, **kw) -> TestClient:
    return TestClient(make_app(engine, **kw))


def token_pieces(text: str) -> list[str]:
    """The text delta of each token of `text` (single-byte pieces here: ASCII replies)."""
    tok = small_tokenizer()
    return [tok.decode([t]) for t in tok.encode(text)]


def test_whole_reply_renders_prompt_and_reports_usage(engine):
    r = client_for(engine).post("/v1/chat/completions", json={"model": MODEL, "messages": USER_HI})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    # The model's "\n" (GLM-4's empty metadata line) is not part of the content.
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello there!", "tool_calls": None},
                      "logprobs": None, "finish_reason": "stop"}
    [call] = engine.calls
    assert small_tokenizer().decode(call.prompt_ids) == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    reply_tokens = len(small_tokenizer().encode("\nHello there!")) + 1  # + the stop token
    assert body["usage"] == {"prompt_tokens": len(call.prompt_ids), "completion_tokens": reply_tokens,
                             "total_tokens": len(call.prompt_ids) + reply_tokens}


def test_stream_exact_chunk_sequence(engine):
    r = client_for(engine).post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL and isinstance(c["created"], int)
        assert "usage" not in c  # only with stream_options.include_usage
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks]
    pieces = token_pieces("Hello there!")
    assert deltas == [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces] + [{}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


def test_stream_include_usage_adds_final_usage_chunk(engine):
    r = client_for(engine).post("/v1/chat/completions", json={
        "messages": USER_HI, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_json(r.text)
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(small_tokenizer().encode("\nHello there!")) + 1
    assert last["usage"]["prompt_tokens"] == len(engine.calls[0].prompt_ids)
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    assert all(c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_n2_each_choice_streams_and_finishes_on_its_own():
    engine = FakeEngine(small_tokenizer(), replies=["\nHello there!", "\nHi"])
    chunks = sse_json(client_for(engine).post("/v1/chat/completions", json={
        "messages": USER_HI, "stream": True, "n": 2}).text)
    order = [c["choices"][0]["index"] for c in chunks]
    assert order[:2] == [0, 1]  # both role chunks first
    assert order != sorted(order)  # interleaved, not one choice after the other
    for i, expected in enumerate(["Hello there!", "Hi"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["delta"].get("content", "") for ch in mine) == expected
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "stop"
        assert [ch["finish_reason"] for ch in mine[:-1]] == [None] * (len(mine) - 1)
    # the shorter reply finished first
    finishes = [k for k, c in enumerate(chunks) if c["choices"][0]["finish_reason"]]
    assert chunks[finishes[0]]["choices"][0]["index"] == 1


def test_whole_n2_and_logprobs_shape():
    engine = FakeEngine(small_tokenizer(), replies=["\nHello there!", "\nHi"])
    body = client_for(engine).post("/v1/chat/completions", json={
        "messages": USER_HI, "n": 2, "logprobs": True, "top_logprobs": 3}).json()
    assert engine.calls[0].params.logprobs == 3 and engine.calls[0].params.n == 2
    for choice, reply in zip(body["choices"], ["\nHello there!", "\nHi"]):
        entries = choice["logprobs"]["content"]
        assert len(entries) == len(small_tokenizer().encode(reply)) + 1
        for e in entries:
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
            assert len(e["top_logprobs"]) == 3
            assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])


def test_stream_logprobs_cover_every_token(engine):
    chunks = sse_json(client_for(engine).post("/v1/chat/completions", json={
        "messages": USER_HI, "stream": True, "logprobs": True}).text)
    entries = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in entries][:-1] == token_pieces("\nHello there!")
    assert all(e["top_logprobs"] == [] for e in entries)  # logprobs without top_logprobs: none listed


def test_max_tokens_cuts_with_length(engine):
    client = client_for(engine)
    body = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "".join(token_pieces("\nHello there!")[:3]).lstrip("\n")
    assert body["usage"]["completion_tokens"] == 3
    # max_completion_tokens wins over max_tokens
    client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 3, "max_completion_tokens": 5})
    assert engine.calls[-1].params.max_tokens == 5


def test_default_max_tokens_is_the_rest_of_the_context(engine):
    client_for(engine, max_model_len=200).post("/v1/chat/completions", json={"messages": USER_HI})
    call = engine.calls[0]
    assert call.params.max_tokens == 200 - len(call.prompt_ids)


def test_request_fields_reach_sampling_params(engine):
    client_for(engine).post("/v1/chat/completions", json={
        "messages": USER_HI, "temperature": 0.3, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "seed": 11,
        "stop": "xyz", "logit_bias": {"17": -2.5}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5],
        "include_stop_str_in_output": True, "skip_special_tokens": False})
    p = engine.calls[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.3, 0.9, 7, 0.05, 11)
    assert p.stop == ["xyz"] and p.logit_bias == {17: -2.5} and p.stop_token_ids == [5]
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0.5, -0.5, 1.2, 2)
    assert p.ignore_eos and p.include_stop_str_in_output and not p.skip_special_tokens
    client_for(engine).post("/v1/chat/completions", json={"messages": USER_HI, "stop": ["a", "b"]})
    assert engine.calls[1].params.stop == ["a", "b"]


def test_content_parts_and_developer_role_render_as_text(engine):
    client_for(engine).post("/v1/chat/completions", json={"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    prompt = small_tokenizer().decode(engine.calls[0].prompt_ids)
    assert prompt == "[gMASK]<sop><|system|>\nbe brief<|user|>\nhi<|assistant|>"


def test_keepalive_is_an_sse_comment():
    engine = FakeEngine(small_tokenizer(), replies=["\nHi!"], step_delay=0.15)
    client = client_for(engine, sse_ping_seconds=0.05)
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    events = sse_events(r.text)
    assert ": ping" in events
    assert all(e == ": ping" or e.startswith("data: ") for e in events)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in sse_json(r.text)) == "Hi!"


def test_engine_error_after_stream_start_is_an_error_event_then_done():
    engine = FakeEngine(small_tokenizer(), fail_after_steps=3)
    r = client_for(engine).post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    assert r.status_code == 200
    chunks = sse_json(r.text)
    assert "error" in chunks[-1] and chunks[-1]["error"]["type"] == "server_error"
    assert all("error" not in c for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_engine_error_whole_is_500_and_the_server_keeps_serving():
    engine = FakeEngine(small_tokenizer(), fail_after_steps=2)
    client = client_for(engine)
    r = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    engine.fail_after_steps = None
    assert client.post("/v1/chat/completions", json={"messages": USER_HI}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusal_is_400_before_any_stream(stream):
    engine = FakeEngine(small_tokenizer(), refuse_with=ValueError("prompt needs more KV blocks than exist"))
    r = client_for(engine).post("/v1/chat/completions", json={"messages": USER_HI, "stream": stream})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "KV blocks" in err["message"]


def test_engine_side_abort_is_not_reported_as_a_normal_finish():
    engine = FakeEngine(small_tokenizer(), replies=["\nHi"], finish_reason_override="abort")
    client = client_for(engine)
    r = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert r.status_code == 503 and r.json()["error"]["message"]
    chunks = sse_json(client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True}).text)
    assert "error" in chunks[-1]
