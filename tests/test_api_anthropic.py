"""POST /v1/messages (Anthropic's Messages API): the chat request it becomes, its reply whole and streamed, its
errors, count_tokens; and the real anthropic SDK against a real uvicorn server."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from fastapi.testclient import TestClient

from glm4serve.engine.types import GuidedSpec
from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    engine_of,
    make_app,
    served,
    shutdown_engines,
    small_tokenizer,
    wait_idle,
)

TOOL = {"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                              "parameters": TOOL["input_schema"]}}
CALL = 'get_weather\n{"city": "Paris"}'
HI = [{"role": "user", "content": "hi"}]


def post(client: TestClient, **body):
    return client.post("/v1/messages", json={"model": MODEL, "max_tokens": 64, **body})


def events_of(body: str) -> list[dict]:
    """The stream's events, after checking framing: `event: <type>` and one `data:` line of that type each."""
    out = []
    for raw in body[:-2].split("\n\n"):
        if raw == ": ping":
            continue
        head, data = raw.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}", raw
        out.append(event)
    return out


def same_prompt(app, messages: list[dict], **chat) -> None:
    """The last /v1/messages request's prompt is the chat route's for `messages`."""
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **chat})
    assert r.status_code == 200, r.text
    calls = engine_of(app).calls
    assert small_tokenizer().decode(calls[-2].prompt_ids) == small_tokenizer().decode(calls[-1].prompt_ids)


def test_a_text_reply_whole():
    app = make_app(replies=["\nHello there!"])
    r = post(TestClient(app), system="be brief", messages=HI, temperature=0.5, top_k=5, metadata={"user_id": "u1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("msg_") and (body["type"], body["role"], body["model"]) == (
        "message", "assistant", MODEL)
    assert body["content"] == [{"type": "text", "text": "Hello there!"}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    prompt = len(engine_of(app).calls[0].prompt_ids)
    assert body["usage"] == {"input_tokens": prompt, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                             "output_tokens": len(small_tokenizer().encode("\nHello there!")) + 1}
    params = engine_of(app).calls[0].params
    assert (params.temperature, params.top_k, params.max_tokens) == (0.5, 5, 64)
    same_prompt(app, [{"role": "system", "content": "be brief"}, *HI])


def test_turns_tool_results_and_blocks_make_the_chat_prompt():
    app = make_app(replies=["\nSunny."])
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "AAAA"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "sunny"}]},
                                     {"type": "text", "text": "and?", "cache_control": {"type": "ephemeral"}}]},
    ]
    system = [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}]
    r = post(TestClient(app), system=system, messages=messages,
             tools=[TOOL, {"type": "web_search_20250305", "name": "web_search"}])
    assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "Sunny."}]
    chat = [{"role": "system", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}]},
            {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "and?"}]
    same_prompt(app, chat, tools=[CHAT_TOOL])


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_is_a_tool_use_block(stream):
    app = make_app(replies=[CALL])
    r = post(TestClient(app), messages=HI, tools=[TOOL], stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        [block] = r.json()["content"]
        assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
        assert (block["name"], block["input"]) == ("get_weather", {"city": "Paris"})
        assert r.json()["stop_reason"] == "tool_use"
        return
    events = events_of(r.text)
    assert [e["type"] for e in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                           "content_block_stop", "message_delta", "message_stop"]
    start, delta = events[2], events[3]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert start["content_block"]["id"].startswith("toolu_")
    assert start["content_block"]["name"] == "get_weather" and start["index"] == delta["index"] == 0
    assert json.loads(delta["delta"]["partial_json"]) == {"city": "Paris"}
    assert events[5]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


@pytest.mark.parametrize("tool_choice, chat_choice", [
    ({"type": "any"}, "required"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "any", "disable_parallel_tool_use": True}, "required"),
])
def test_tool_choice_forces_a_call_as_the_chat_route_does(tool_choice, chat_choice):
    app = make_app(replies=[CALL])
    r = post(TestClient(app), messages=HI, tools=[TOOL], tool_choice=tool_choice)
    assert r.status_code == 200 and r.json()["stop_reason"] == "tool_use"
    parallel = {"parallel_tool_calls": False} if tool_choice.get("disable_parallel_tool_use") else {}
    r = TestClient(app).post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "tools": [CHAT_TOOL],
                                                           "tool_choice": chat_choice, "max_tokens": 64, **parallel})
    assert r.status_code == 200
    ours, chats = engine_of(app).calls
    assert isinstance(ours.params.guided, GuidedSpec) and ours.params.guided == chats.params.guided


def test_a_stop_sequence_is_named_whole_and_streamed():
    app = make_app(replies=["\nLet me see."])
    r = post(TestClient(app), messages=HI, stream=True, stop_sequences=["see"])
    events = events_of(r.text)
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "Let me "
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "see"}
    assert events[-2]["usage"]["output_tokens"] > 0 and events[-1] == {"type": "message_stop"}
    whole = post(TestClient(app), messages=HI, stop_sequences=["see"]).json()
    assert (whole["stop_reason"], whole["stop_sequence"], whole["content"][0]["text"]) == (
        "stop_sequence", "see", "Let me ")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cuts_with_max_tokens(stream):
    app = make_app(replies=["\nHello there, a long reply!"])
    r = post(TestClient(app), messages=HI, max_tokens=3, stream=stream)
    stop = events_of(r.text)[-2]["delta"]["stop_reason"] if stream else r.json()["stop_reason"]
    assert stop == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_a_thinking_block(stream):
    app = make_app(replies=["\nThe user greets me.</think>\nHello!"], reasoning_parser="deepseek_r1")
    r = post(TestClient(app), messages=HI, stream=stream, thinking={"type": "enabled", "budget_tokens": 1024})
    if not stream:
        assert r.json()["content"] == [{"type": "thinking", "thinking": "The user greets me.", "signature": ""},
                                       {"type": "text", "text": "Hello!"}]
        return
    events = events_of(r.text)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    thinking = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    assert starts == ["thinking", "text"] and thinking == "The user greets me."


def test_a_failure_midway_is_an_error_event_and_nothing_leaks():
    app = make_app(replies=["\nHello there, a long reply!"], fail_after_steps=4)
    events = events_of(post(TestClient(app), messages=HI, stream=True).text)
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "api_error"
    wait_idle(engine_of(app))


@pytest.mark.parametrize("body, status, kind, says", [
    ({"messages": HI, "max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": []}, 400, "invalid_request_error", "messages"),
    ({"messages": HI, "model": "claude-opus-4"}, 404, "not_found_error", "claude-opus-4"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400, "invalid_request_error",
     "'video' are not supported"),
    ({"messages": HI, "tools": [TOOL], "tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "names"),
    ({"messages": HI, "tools": [{**TOOL, "input_schema": {"type": 3}}]}, 400, "invalid_request_error",
     "tools.0.input_schema is not a valid JSON Schema"),
    ({"messages": HI, "tool_choice": {"type": "any"}}, 400, "invalid_request_error", "needs a tool"),
    ({"messages": HI, "max_tokens": 10 ** 6}, 400, "invalid_request_error", "exceed context limit"),
    ({"messages": [{"role": "user", "content": [{"type": {}}]}]}, 400, "invalid_request_error", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": {}}]}]}]}, 400, "invalid_request_error", "type"),
])
def test_errors_are_anthropics_envelope(body, status, kind, says):
    r = TestClient(make_app()).post("/v1/messages", json={"model": MODEL, "max_tokens": 8, **body})
    assert r.status_code == status, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and says in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"type", "message"}


def test_the_key_comes_as_x_api_key_or_bearer():
    app = make_app(api_key="k")
    client = TestClient(app)
    assert post(client, messages=HI, max_tokens=2).json()["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": "k"}, {"Authorization": "Bearer k"}):
        assert client.post("/v1/messages", headers=headers, json={"max_tokens": 2, "messages": HI}).status_code == 200
    assert client.post("/v1/chat/completions", headers={"x-api-key": "k"}, json={"messages": HI}).status_code == 200
    assert client.post("/v1/chat/completions", headers={"x-api-key": "no"}, json={"messages": HI}).status_code == 401


def test_count_tokens_is_the_prompt_the_reply_would_get():
    app = make_app()
    client = TestClient(app)
    body = {"model": MODEL, "system": "be brief", "messages": HI, "tools": [TOOL]}
    counted = client.post("/v1/messages/count_tokens", json=body)
    assert counted.status_code == 200 and set(counted.json()) == {"input_tokens"}
    post(client, **{**body, "max_tokens": 2})
    assert counted.json()["input_tokens"] == len(engine_of(app).calls[0].prompt_ids)


# ---- the anthropic SDK against a real server ------------------------------------------------


def scripted_reply(call) -> list[str]:
    prompt = small_tokenizer().decode(call.prompt_ids)
    if "## get_weather" in prompt and "<|observation|>" not in prompt:
        return [CALL]
    return ["\nHello there!"]


@pytest.fixture(scope="module")
def base_url():
    app = make_app(replies=scripted_reply, api_key="test-key")
    with served(app) as url:
        yield url


def test_the_anthropic_sdk_whole_streamed_tools_and_errors(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="test-key", max_retries=0, timeout=10)
    message = client.messages.create(model=MODEL, max_tokens=32, messages=HI)
    assert message.content[0].text == "Hello there!" and message.stop_reason == "end_turn"
    with client.messages.stream(model=MODEL, max_tokens=32, messages=HI) as stream:
        assert "".join(stream.text_stream) == "Hello there!"
        final = stream.get_final_message()
    assert final.content[0].text == "Hello there!" and final.usage.output_tokens == message.usage.output_tokens
    asked = [{"role": "user", "content": "weather in Paris?"}]
    called = client.messages.create(model=MODEL, max_tokens=32, messages=asked, tools=[TOOL])
    [use] = called.content
    assert (use.type, use.name, use.input, called.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"},
                                                                   "tool_use")
    with client.messages.stream(model=MODEL, max_tokens=32, messages=asked, tools=[TOOL]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].input == {"city": "Paris"}
    answered = client.messages.create(model=MODEL, max_tokens=32, tools=[TOOL], messages=[
        *asked, {"role": "assistant", "content": called.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert answered.content[0].text == "Hello there!"
    assert client.messages.count_tokens(model=MODEL, messages=HI).input_tokens == message.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=32, messages=[])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-opus-4", max_tokens=32, messages=HI)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base_url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=HI)


def test_claude_codes_system_turns_a_prefill_and_other_result_blocks_make_the_chat_prompt():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    turns = [*HI, {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "assistant", "content": "Sure:"}]
    assert post(client, messages=turns).json()["content"] == [{"type": "text", "text": "\nHello"}]
    same_prompt(app, [*HI, {"role": "system", "content": "be brief"}, {"role": "assistant", "content": "Sure:"}],
                continue_final_message=True, add_generation_prompt=False)
    assert small_tokenizer().decode(engine_of(app).calls[0].prompt_ids).endswith("<|assistant|>\nSure:")
    results = [{"role": "user", "content": "find a tool"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "t1",
                    "content": [{"type": "tool_reference", "tool_name": "get_weather"}]},
                   {"type": "tool_search_tool_result", "tool_use_id": "t0", "content": {}}]}]
    assert post(client, messages=results, tools=[TOOL]).status_code == 200
    same_prompt(app, [results[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "[a tool_reference block left out]"}], tools=[CHAT_TOOL])


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_an_output_format_is_the_chat_routes_response_format(field):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    app = make_app(replies=['{"ok": true}'])
    fmt = {"type": "json_schema", "schema": schema}
    r = post(TestClient(app), messages=HI, **{field: {"format": fmt} if field == "output_config" else fmt})
    assert r.status_code == 200 and json.loads(r.json()["content"][0]["text"]) == {"ok": True}
    chat = TestClient(app).post("/v1/chat/completions", json={
        "model": MODEL, "messages": HI, "max_tokens": 64, "response_format": {
            "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}})
    assert chat.status_code == 200
    ours, chats = engine_of(app).calls
    assert ours.params.guided is not None and ours.params.guided == chats.params.guided
    bad = {"type": "json_schema", "schema": {"type": 3}}
    r = post(TestClient(app), messages=HI, **{field: {"format": bad} if field == "output_config" else bad})
    param = "output_config.format.schema" if field == "output_config" else "output_format.schema"
    assert r.status_code == 400 and f"{param} is not a valid JSON Schema" in r.json()["error"]["message"]


def test_the_streams_first_event_counts_the_prompts_cached_tokens():
    app = make_app(replies=["\nHello"])
    long = [{"role": "user", "content": "a long question about the sea " * 8}]
    first, second = (events_of(post(TestClient(app), messages=long, stream=True).text) for _ in range(2))
    assert first[0]["message"]["usage"]["cache_read_input_tokens"] == 0
    start, end = second[0]["message"]["usage"], second[-2]["usage"]
    assert start["cache_read_input_tokens"] > 0 and start["input_tokens"] + start["cache_read_input_tokens"] == len(
        engine_of(app).calls[1].prompt_ids)
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == (end["input_tokens"],
                                                                         end["cache_read_input_tokens"])


@pytest.mark.parametrize("extra", [{"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
                                   {"tools": [TOOL], "tool_choice": {"type": "any"}}])
def test_a_prefill_under_a_grammar_is_refused(extra):
    r = post(TestClient(make_app()), messages=[*HI, {"role": "assistant", "content": "{"}], **extra)
    assert r.status_code == 400 and "prefill" in r.json()["error"]["message"]


def test_the_context_refuses_in_the_words_claude_code_reads():
    """Claude Code compacts the conversation on "prompt is too long" and asks for fewer tokens on the other."""
    import re

    app = make_app(max_model_len=64)
    client = TestClient(app)
    prompt = len(client.post("/tokenize", json={"messages": HI, "add_generation_prompt": True}).json()["tokens"])
    e = post(client, messages=HI, max_tokens=100).json()["error"]
    m = re.search(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)", e["message"])
    assert m is not None and tuple(map(int, m.groups())) == (prompt, 100, 64), e
    e = post(client, messages=[{"role": "user", "content": "sea " * 80}], max_tokens=1).json()["error"]
    m = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", e["message"])
    assert m is not None and int(m[1]) >= 64 and int(m[2]) == 64, e


def test_a_held_call_streams_ping_events_after_message_start_as_anthropic_does():
    """Under tool_choice auto a call is held until whole: meanwhile `ping` events at the ping interval, never
    before message_start (the SDK's stream helper refuses any event before it); a client gone frees all."""
    app = make_app(replies=[CALL], step_delay=0.05, sse_ping_seconds=0.02)
    with served(app) as url:
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=10)
        asked = [{"role": "user", "content": "weather in Paris?"}]
        with client.messages.stream(model=MODEL, max_tokens=32, messages=asked, tools=[TOOL]) as stream:
            final = stream.get_final_message()  # the helper takes the pings (and hides them)
        assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"
        body = {"model": MODEL, "max_tokens": 32, "messages": asked, "tools": [TOOL], "stream": True}
        kinds = [e["type"] for e in events_of(httpx.post(url + "/v1/messages", json=body, timeout=10).text)]
        assert kinds[0] == "message_start" and kinds[1:kinds.index("content_block_start")].count("ping") >= 3
        with httpx.stream("POST", url + "/v1/messages", json=body, timeout=10) as r:
            for line in r.iter_lines():
                if line == "event: ping":
                    break
    wait_idle(engine_of(app))


def test_a_long_prefill_streams_message_start_and_pings_before_the_first_output():
    """A prompt prefilled over many steps brings no output for a while: message_start goes out at the first
    ping interval (the SDK's stream helper takes nothing before it), pings follow; the prefix cache's share of
    the prompt, unknown then, is message_delta's usage."""
    app = make_app(step_delay=0.03, sse_ping_seconds=0.02, max_num_batched_tokens=16, block_size=16)
    asked = [{"role": "user", "content": "sea " * 120}]
    body = {"model": MODEL, "max_tokens": 32, "messages": asked, "stream": True}
    with served(app) as url:
        events = events_of(httpx.post(url + "/v1/messages", json=body, timeout=30).text)
        kinds = [e["type"] for e in events]
        opened = kinds.index("content_block_start")
        assert kinds[0] == "message_start" and kinds[1:opened].count("ping") >= 3, kinds[:opened + 1]
        prompt = len(engine_of(app).calls[-1].prompt_ids)
        assert events[0]["message"]["usage"]["input_tokens"] == prompt
        again = events_of(httpx.post(url + "/v1/messages", json=body, timeout=30).text)
        cached = again[-2]["usage"]["cache_read_input_tokens"]  # message_delta's
        assert again[-2]["type"] == "message_delta" and cached >= prompt - 16 > 0
        assert again[-2]["usage"]["input_tokens"] == prompt - cached
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=30)
        with client.messages.stream(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "sky " * 120}]
                                    ) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == "Hello there!" and final.stop_reason == "end_turn"
    wait_idle(engine_of(app))
