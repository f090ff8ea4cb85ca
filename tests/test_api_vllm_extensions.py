"""vLLM's extensions of the chat route (and the completions route where they are shared): what vLLM's clients
send beside OpenAI's fields and what they read back, over the real engine and a scripted model runner."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    engine_of,
    make_app,
    shutdown_engines,
    small_tokenizer,
    sse_json,
    wait_idle,
)

USER_HI = [{"role": "user", "content": "hi"}]


def client_for(**kw) -> TestClient:
    return TestClient(make_app(**kw))


def test_vllm_allowed_token_ids_and_bad_words():
    tok = small_tokenizer()
    client = client_for()
    allowed = tok.encode("yes no")
    body = client.post("/v1/completions", json={"prompt": "Is it?", "allowed_token_ids": allowed * 1000,
                                                 "max_tokens": 6, "temperature": 0}).json()
    [call] = engine_of(client.app).calls
    assert call.params.allowed_token_ids == sorted(set(allowed))  # each once: the sampler reads them every step
    [choice] = body["choices"]  # no stop token among them: only max_tokens ends it, as in vLLM
    assert set(tok.encode(choice["text"])) <= set(allowed) and choice["finish_reason"] == "length"
    reply = client.post("/v1/chat/completions", json={"messages": USER_HI, "bad_words": ["there", " there"],
                                                      "temperature": 0}).json()["choices"][0]["message"]["content"]
    words = engine_of(client.app).calls[-1].params.bad_words_token_ids
    assert sorted(words) == sorted([tok.encode("there"), tok.encode(" there")])  # a word tokenized once
    assert reply.startswith("Hello") and "there" not in reply  # the script's " there" was ruled out
    client.post("/v1/chat/completions", json={"messages": USER_HI, "bad_words": ["<|user|>"]})
    assert engine_of(client.app).calls[-1].params.bad_words_token_ids == [tok.encode("<|user|>"),
                                                                          tok.encode(" <|user|>")]
    assert len(tok.encode("<|user|>")) == 1  # the special token itself is banned
    for extra, param in (({"allowed_token_ids": []}, "allowed_token_ids"),
                         ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
                         ({"bad_words": [" "]}, "bad_words.0"), ({"bad_words": ["a"] * 17}, "bad_words")):
        r = client.post("/v1/chat/completions", json={"messages": USER_HI, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_rules_that_leave_no_token_to_write_are_a_400_not_a_stray_token():
    """allowed_token_ids of stop tokens only, before min_tokens: nothing may be written."""
    client = client_for()
    stops = list(small_tokenizer().stop_token_ids)
    for temperature in (0, 1.0):
        r = client.post("/v1/completions", json={"prompt": "x", "allowed_token_ids": stops, "min_tokens": 3,
                                                 "max_tokens": 5, "temperature": temperature})
        assert r.status_code == 400 and "leave no token" in r.json()["error"]["message"], r.text


def test_priority_is_taken_under_the_priority_policy_and_refused_before_a_stream_otherwise():
    fcfs = client_for()
    for stream in (False, True):
        r = fcfs.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "priority": 2, "stream": stream})
        assert r.status_code == 400, r.text
        assert "--scheduling-policy priority" in r.json()["error"]["message"]
    assert fcfs.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "priority": 0}).status_code == 200
    client = client_for(scheduling_policy="priority")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "priority": -4})
    assert r.status_code == 200
    r = client.post("/v1/responses", json={"input": "hi", "priority": 3})
    assert r.status_code == 200
    assert [c.params.priority for c in engine_of(client.app).calls] == [-4, 3]


def test_cache_salt_reaches_the_engine_from_every_route_and_an_empty_one_is_refused():
    client = client_for()
    hi = [{"role": "user", "content": "hi"}]
    assert client.post("/v1/chat/completions", json={"messages": hi, "cache_salt": "s1"}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi", "cache_salt": "s2"}).status_code == 200
    assert client.post("/v1/responses", json={"input": "hi", "cache_salt": "s3"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": hi}).status_code == 200
    assert [c.params.cache_salt for c in engine_of(client.app).calls] == ["s1", "s2", "s3", None]
    for route, body in (("/v1/chat/completions", {"messages": hi}), ("/v1/completions", {"prompt": "hi"}),
                        ("/v1/responses", {"input": "hi"})):
        r = client.post(route, json={**body, "cache_salt": ""})
        assert r.status_code == 400 and "'cache_salt' must be a non-empty string" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "cache_salt", route


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id_whole_and_streamed():
    tok = small_tokenizer()
    ids = tok.encode("\nHello there!")[1:]  # the opening "\n" the content leaves out
    client = client_for()
    body = {"messages": USER_HI, "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    chunks = sse_json(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    for entries in (whole, streamed):
        assert [e["token"] for e in entries][:-1] == [f"token_id:{t}" for t in ids]
        assert [e["bytes"] for e in entries][:-1] == [list(tok.token_bytes(t)) for t in ids]  # still the token's
        assert all(t["token"].startswith("token_id:") for e in entries for t in e["top_logprobs"])


def test_the_stop_token_is_text_only_with_include_stop_str_in_output_and_special_tokens_kept():
    """As vLLM: the stop token's text joins the reply when both ask for it, never otherwise."""
    client = client_for(replies=["\nHi<|user|>"])
    for extra, content in (({}, "Hi"), ({"skip_special_tokens": False}, "Hi"),
                           ({"include_stop_str_in_output": True}, "Hi"),
                           ({"include_stop_str_in_output": True, "skip_special_tokens": False}, "Hi<|user|>")):
        r = client.post("/v1/chat/completions", json={"messages": USER_HI, **extra})
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (content, "stop"), extra


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_and_return_token_ids_as_vllm_sends_them(stream):
    """stop_reason: GLM-4's <|user|> by its id, <|endoftext|> as None (vLLM's); return_token_ids: the prompt's
    ids (streamed: on each choice's first chunk) and each choice's generated ones, the stop token too."""
    tok = small_tokenizer()
    user = tok.special_tokens["<|user|>"]
    replies = ["\nHi<|user|>", "\nHi there"]
    client = client_for(replies=replies)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER_HI, "n": 2, "stream": stream,
                                                  "return_token_ids": True})
    prompt_ids = engine_of(client.app).calls[0].prompt_ids
    expected_ids = [tok.encode(replies[0], allow_special=True), tok.encode(replies[1]) + [tok.stop_token_ids[0]]]
    if not stream:
        body = r.json()
        assert body["prompt_token_ids"] == prompt_ids
        assert [c["token_ids"] for c in body["choices"]] == expected_ids
        assert [c["stop_reason"] for c in body["choices"]] == [user, None]
        return
    chunks = sse_json(r.text)
    for i in range(2):
        mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == prompt_ids and all("prompt_token_ids" not in c for c in mine[1:])
        assert [t for c in mine for t in c["choices"][0]["token_ids"]] == expected_ids[i]
        assert mine[-1]["choices"][0]["stop_reason"] == [user, None][i]
        assert all("stop_reason" not in c["choices"][0] for c in mine[:-1])


def test_no_token_ids_unless_asked():
    body = client_for().post("/v1/chat/completions", json={"model": MODEL, "messages": USER_HI}).json()
    assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]


def test_the_reply_is_named_by_the_clients_request_id_as_vllm_names_it():
    """X-Request-Id, else the body's request_id, names the reply (vLLM's `chatcmpl-{id}`); the same id sent twice
    at once is still two requests in the engine."""
    client = client_for()
    post = lambda **kw: client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER_HI}, **kw)  # noqa: E731
    assert post(headers={"X-Request-Id": "trace-7"}).json()["id"] == "chatcmpl-trace-7"
    body = {"model": MODEL, "messages": USER_HI, "request_id": "abc", "stream": True}
    assert {c["id"] for c in sse_json(client.post("/v1/chat/completions", json=body).text)} == {"chatcmpl-abc"}
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                       headers={"X-Request-Id": "trace-8"}).json()["id"] == "cmpl-trace-8"
    engine_ids = [c.request_id for c in engine_of(client.app).calls]
    assert len(set(engine_ids)) == 3 and engine_ids[0].startswith("chatcmpl-trace-7-")
    assert post().json()["id"] != post().json()["id"]
    for sent in ({"headers": {"X-Request-Id": "x" * 257}}, {"json": {"messages": USER_HI, "request_id": "x" * 257}}):
        r = client.post("/v1/chat/completions", **({"json": {"messages": USER_HI}} | sent))
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"


async def test_one_request_id_sent_by_concurrent_requests_serves_them_all():
    app = make_app(step_delay=0.01)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        replies = await asyncio.gather(*[client.post("/v1/chat/completions", headers={"X-Request-Id": "same"},
                                                     json={"model": MODEL, "messages": USER_HI}) for _ in range(4)])
    assert [r.status_code for r in replies] == [200] * 4
    assert {r.json()["id"] for r in replies} == {"chatcmpl-same"}


def test_requests_vllm_takes_are_taken_as_it_takes_them():
    """tools: [] is no tools (tool_choice auto or required then calls nothing, as OpenAI's and vLLM's); a tool
    or a named tool_choice without its type is a function; GLM-4's own observation role is a tool's result;
    top_logprobs 0 needs no logprobs."""
    client = client_for()
    post = lambda **kw: client.post("/v1/chat/completions", json={"messages": USER_HI, **kw})  # noqa: E731
    for choice in ("auto", "required", "none"):
        r = post(tools=[], tool_choice=choice)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello there!"
        assert engine_of(client.app).calls[-1].params.guided is None
    tool = {"function": {"name": "f", "parameters": {"type": "object"}}}
    assert post(tools=[tool], tool_choice={"function": {"name": "f"}}).status_code == 200
    assert engine_of(client.app).calls[-1].params.guided is not None  # the named call is forced
    assert post(top_logprobs=0).status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "weather?"}, {"role": "observation", "content": "sunny"}]})
    assert r.status_code == 200
    prompt = small_tokenizer().decode(engine_of(client.app).calls[-1].prompt_ids)
    assert prompt == "[gMASK]<sop><|user|>\nweather?<|observation|>\nsunny<|assistant|>"


def test_invocations_run_a_chat_or_a_completion_request_by_its_body():
    app = make_app(replies=["\nHello there!"], api_key="k")
    client = TestClient(app, headers={"Authorization": "Bearer k"})
    chat = client.post("/invocations", json={"messages": USER_HI, "max_tokens": 8})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    assert chat.json()["choices"][0]["message"]["content"] == "Hello there!"
    completion = client.post("/invocations", json={"prompt": "Write:", "max_tokens": 4, "stream": True})
    chunks = sse_json(completion.text)
    assert completion.status_code == 200 and {c["object"] for c in chunks} == {"text_completion"}
    calls = engine_of(app).calls
    assert small_tokenizer().decode(calls[0].prompt_ids) == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert small_tokenizer().decode(calls[1].prompt_ids) == "[gMASK]<sop>Write:"
    for body, param, says in (({"model": MODEL}, None, "messages"), ([1, 2], None, "prompt"),
                              ({"messages": USER_HI, "temperature": 3}, "temperature", "2"),
                              ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "integer")):
        r = client.post("/invocations", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
    r = client.post("/invocations", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert TestClient(app).post("/invocations", json={"prompt": "x"}).status_code == 401
    wait_idle(engine_of(app))
