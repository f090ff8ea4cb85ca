"""POST /v1/responses over the scripted engine: the prompt it makes (the chat route's), the response
object, the stream's events, tool calls, logprobs, and the 400s of what this server does not do.
Stored responses and follow-ups: test_api_response_store.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    engine_of,
    full_blocks,
    make_app,
    shutdown_engines,
    small_tokenizer,
    sse_events,
    wait_idle,
)

TOOL = {"type": "function", "name": "get_weather", "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
CALL = 'get_weather\n{"city": "Paris"}'


def events_of(body: str) -> list[dict]:
    """The stream's events, after checking framing: `event: <type>` then one `data:` line each,
    sequence numbers 0, 1, 2, ... and no `[DONE]`."""
    out = []
    for raw in sse_events(body):
        if raw == ": ping":
            continue
        head, data = raw.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), raw
        event = json.loads(data[len("data: "):])
        assert event["type"] == head[len("event: "):] and event["sequence_number"] == len(out)
        out.append(event)
    return out


def test_text_reply_whole():
    app = make_app(replies=["\nHello there!"])
    r = TestClient(app).post("/v1/responses", json={"model": MODEL, "input": "hi", "instructions": "be brief",
                                                     "temperature": 0.5, "metadata": {"k": "v"}})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    echoed = (body["model"], body["instructions"], body["temperature"], body["metadata"])
    assert echoed == (MODEL, "be brief", 0.5, {"k": "v"})
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["id"].startswith("msg_")
    assert item["content"] == [{"type": "output_text", "text": "Hello there!", "annotations": [], "logprobs": []}]
    [call] = engine_of(app).calls
    assert small_tokenizer().decode(call.prompt_ids) == "[gMASK]<sop><|system|>\nbe brief<|user|>\nhi<|assistant|>"
    n_out = len(small_tokenizer().encode("\nHello there!")) + 1
    details = {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}
    assert body["usage"] == {"input_tokens": len(call.prompt_ids), "input_tokens_details": details,
                             "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": len(call.prompt_ids) + n_out}
    assert body["incomplete_details"] is None and body["error"] is None


def test_input_items_make_the_chat_routes_prompt():
    items = [
        {"role": "developer", "content": "use tools"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather"},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # dropped
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "user", "content": "thanks"},
    ]
    messages = [
        {"role": "system", "content": "rules"},
        {"role": "developer", "content": "use tools"},
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "thanks"},
    ]
    app = make_app()
    client = TestClient(app)
    assert client.post("/v1/responses", json={"input": items, "instructions": "rules", "tools": [TOOL],
                                              "max_output_tokens": 7, "top_p": 0.5, "seed": 3}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": messages, "tools": [CHAT_TOOL],
                                                     "max_tokens": 7, "top_p": 0.5, "seed": 3}).status_code == 200
    ours, chat = engine_of(app).calls
    assert ours.prompt_ids == chat.prompt_ids
    assert "<|observation|>\nsunny" in small_tokenizer().decode(ours.prompt_ids)
    assert (ours.params.max_tokens, ours.params.top_p, ours.params.seed) == (7, 0.5, 3)


def test_a_function_tool_renders_as_the_client_wrote_it_as_on_chat():
    """Its keys' order, a null and a key of the client's own stay as they are, on both routes."""
    tool = {"parameters": {"type": "object"}, "type": "function", "description": None, "name": "f", "x-extra": 1}
    chat_tool = {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    app = make_app()
    client = TestClient(app)
    assert client.post("/v1/responses", json={"input": "hi", "tools": [tool]}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "tools": [chat_tool]}).status_code == 200
    ours, chat = engine_of(app).calls
    assert ours.prompt_ids == chat.prompt_ids
    assert json.dumps(chat_tool["function"], indent=4) in small_tokenizer().decode(ours.prompt_ids)


def test_stream_of_a_text_reply():
    app = make_app(replies=["\nHello there!"])
    # whole KV blocks in the prompt: the usage's cache counts are not all 0
    r = TestClient(app).post("/v1/responses", json={"input": "hi " * 24, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in deltas)
    assert "".join(e["delta"] for e in deltas) == "Hello there!" == events[-4]["text"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"] == events[0]["response"]["id"]
    assert final["output"] == [events[-2]["item"]]
    assert final["output"][0]["content"][0]["text"] == "Hello there!"
    assert final["usage"]["output_tokens"] == len(small_tokenizer().encode("\nHello there!")) + 1
    [call] = engine_of(app).calls
    assert full_blocks(call) > 0
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}


def test_an_empty_tools_list_is_no_tools():
    app = make_app()
    client = TestClient(app)
    for body in ({"input": "hi", "tools": []}, {"input": "hi", "tools": [], "tool_choice": "auto"}):
        r = client.post("/v1/responses", json=body)
        assert r.status_code == 200 and r.json()["output"][0]["type"] == "message", r.text
    # required beside no tool calls nothing, as on the chat route; beside tools of which none can be called, a 400
    r = client.post("/v1/responses", json={"input": "hi", "tools": [], "tool_choice": "required"})
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message"
    r = client.post("/v1/responses", json={"input": "hi", "tools": [{"type": "web_search"}], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_makes_an_incomplete_response(stream):
    app = make_app(replies=["\nHello there!"])
    r = TestClient(app).post("/v1/responses", json={"input": "hi", "max_output_tokens": 3, "stream": stream})
    body = events_of(r.text)[-1]["response"] if stream else r.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["usage"]["output_tokens"] == 3
    if stream:
        assert events_of(r.text)[-1]["type"] == "response.incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_function_call(stream):
    app = make_app(replies=[CALL])
    r = TestClient(app).post("/v1/responses", json={"input": "weather?", "tools": [TOOL], "stream": stream,
                                                     "include": ["message.output_text.logprobs"]})
    assert r.status_code == 200
    events = events_of(r.text) if stream else []
    body = events[-1]["response"] if stream else r.json()
    [item] = body["output"]
    assert item["type"] == "function_call" and item["status"] == "completed" and item["id"].startswith("fc_")
    assert (item["name"], item["arguments"]) == ("get_weather", '{"city": "Paris"}')
    assert item["call_id"].startswith("call_")
    assert body["tools"][0]["name"] == "get_weather" and body["tool_choice"] == "auto"
    if stream:
        args = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        assert "".join(args) == item["arguments"]
        done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        assert (done["name"], done["arguments"]) == ("get_weather", item["arguments"])
        assert not any(e["type"].startswith("response.output_text") for e in events)


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_ends_the_reply_at_its_first_whole_call(stream):
    app = make_app(replies=[CALL + "<|assistant|>get_weather\n{\"city\": \"Rome\"}"])
    r = TestClient(app).post("/v1/responses", json={"input": "weather?", "tools": [TOOL], "stream": stream,
                                                     "parallel_tool_calls": False})
    body = events_of(r.text)[-1]["response"] if stream else r.json()
    [item] = body["output"]
    assert (item["type"], item["arguments"], item["status"]) == ("function_call", '{"city": "Paris"}', "completed")
    assert body["status"] == "completed"
    assert body["usage"]["output_tokens"] == len(small_tokenizer().encode(CALL + "<|assistant|>"))
    wait_idle(engine_of(app))  # the rest was not generated: the request was aborted, its blocks are back


def test_forced_call_and_json_schema_put_a_grammar_on_the_reply():
    app = make_app(replies=[CALL, '\n{"a": 1}'])
    client = TestClient(app)
    forced = client.post("/v1/responses", json={"input": "w", "tools": [TOOL],
                                                "tool_choice": {"type": "function", "name": "get_weather"}})
    assert forced.status_code == 200 and forced.json()["tool_choice"] == {"type": "function", "name": "get_weather"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    shaped = client.post("/v1/responses", json={"input": "w", "text": {"format": fmt}})
    assert shaped.status_code == 200 and shaped.json()["text"] == {"format": fmt}
    forced_call, shaped_call = engine_of(app).calls
    assert forced_call.params.guided is not None and shaped_call.params.guided is not None


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_on_output_text(stream):
    app = make_app(replies=["\nHello there!"])
    r = TestClient(app).post("/v1/responses", json={"input": "hi", "stream": stream, "top_logprobs": 2,
                                                     "include": ["message.output_text.logprobs"]})
    body = events_of(r.text)[-1]["response"] if stream else r.json()
    part = body["output"][0]["content"][0]
    # the stop token's included; the opening "\n", which the text leaves out, is not
    assert len(part["logprobs"]) == body["usage"]["output_tokens"] - 1
    assert all(len(lp["top_logprobs"]) == 2 and lp["logprob"] <= 0 for lp in part["logprobs"])
    assert "".join(lp["token"] for lp in part["logprobs"][:-1]) == part["text"] == "Hello there!"
    if stream:
        deltas = [e for e in events_of(r.text) if e["type"] == "response.output_text.delta"]
        assert sum(len(e["logprobs"]) for e in deltas) >= len(part["logprobs"]) - 1


def test_failure_midway_is_an_error_event_and_nothing_leaks():
    app = make_app(replies=["\nHello there, a long reply!"], fail_after_steps=4)
    r = TestClient(app).post("/v1/responses", json={"input": "hi", "stream": True})
    events = events_of(r.text)
    assert events[-2]["type"] == "error" and "failed" in events[-2]["message"]
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and failed["status"] == "failed"
    assert failed["error"] == {"code": events[-2]["code"], "message": events[-2]["message"]}
    assert "data: [DONE]" not in r.text
    wait_idle(engine_of(app))


@pytest.mark.parametrize("body, param, says", [
    ({"input": []}, "input", "must not be empty"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "'resp_1' not found"),
    ({"input": "x", "background": True, "store": False}, "background", "requires store to be true"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_1"}]}, "input.1",
     "Item with id 'msg_1' not found"),
    ({"input": [{"role": "user", "content": [{"type": "input_video", "video_url": "x"}]}]},
     "input.0.content.0.type", "input_text"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
    ({"input": [{"type": ["x"]}]}, "input", "not supported"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "custom", "name": "get_weather"}}, "tool_choice",
     "no custom tool"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                     "tools": [{"type": "function", "name": "nope"}]}},
     "tool_choice.tools.0", "'nope'"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                     "tools": [{"type": "function", "name": ["f"]}]}},
     "tool_choice.tools.0.name", "string"),
    ({"input": "x", "tools": [{"type": "web_search"}, {**TOOL, "parameters": {"type": 3}}]}, "tools.1.parameters",
     "tools.1.parameters is not a valid JSON Schema"),
    ({"input": "x", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search_preview"}},
     "tool_choice", "'web_search_preview' is not supported"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format",
     "needs a name and a schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": 3}}}},
     "text.format.schema", "not a valid JSON Schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"$schema": [1]}}}},
     "text.format.schema", "$schema must be a string"),
    ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice.name", "tool_choice.name: Field required"),
    ({"input": "x", "tools": [{**TOOL, "parameters": {"type": 3}}]}, "tools.0.parameters",
     "tools.0.parameters is not a valid JSON Schema"),  # the chat route's check, in the Responses names
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "hi"}]}]}, "input",
     "output_text is an assistant's"),
    ({"input": "x", "max_output_tokens": 10 ** 6}, "input", "maximum context length"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs", "20"),
    ({"input": "x", "model": "gpt-5"}, "model", "does not exist"),
])
def test_what_is_refused_is_a_400_naming_the_field(body, param, says):
    app = make_app()
    r = TestClient(app).post("/v1/responses", json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert engine_of(app).calls == []


def test_server_limits_name_the_responses_fields():
    app = make_app(max_messages=2, max_tokens_limit=8)
    client = TestClient(app)
    r = client.post("/v1/responses", json={"input": [{"role": "user", "content": "a"}] * 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = client.post("/v1/responses", json={"input": "a", "max_output_tokens": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"


def test_with_a_reasoning_parser_the_thinking_is_a_reasoning_item_whole_and_streamed():
    """GLM-Z1's thinking, split off by the reasoning parser, is a reasoning item before the message, in
    the OpenAI SDK's types; its tokens are usage's reasoning_tokens; both shapes hold the same items."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    reply = "\nGreeting.</think>\nHello there!"
    client = TestClient(make_app(replies=[reply], reasoning_parser="deepseek_r1"))
    body = client.post("/v1/responses", json={"input": "hi"}).json()
    Response.model_validate(body)
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Greeting."}] and reasoning["summary"] == []
    assert message["content"][0]["text"] == "Hello there!"
    thinking = len(small_tokenizer().encode("\nGreeting.</think>"))
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == thinking
    assert 0 < thinking < body["usage"]["output_tokens"]

    events = events_of(client.post("/v1/responses", json={"input": "hi", "stream": True}).text)
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event)
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "Greeting."
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there!"
    assert [e["text"] for e in events if e["type"] == "response.reasoning_text.done"] == ["Greeting."]
    done = events[-1]["response"]
    assert [(i["type"], i["status"]) for i in done["output"]] == [("reasoning", "completed"), ("message", "completed")]
    assert [i["content"] for i in done["output"]] == [i["content"] for i in body["output"]]
    assert done["usage"] == body["usage"]
    # a follow-up sends the reasoning item back: it is dropped, the answer kept
    r = client.post("/v1/responses", json={"input": "and?", "previous_response_id": body["id"]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_then_a_call_is_a_reasoning_item_then_a_function_call(stream):
    client = TestClient(make_app(replies=["Weather, so a call.</think>" + CALL], reasoning_parser="deepseek_r1"))
    r = client.post("/v1/responses", json={"input": "weather?", "tools": [TOOL], "stream": stream})
    body = events_of(r.text)[-1]["response"] if stream else r.json()
    assert [(i["type"], i["status"]) for i in body["output"]] == [("reasoning", "completed"),
                                                                  ("function_call", "completed")]
    assert body["output"][0]["content"][0]["text"] == "Weather, so a call."
    assert (body["output"][1]["name"], body["output"][1]["arguments"]) == ("get_weather", '{"city": "Paris"}')


def test_an_empty_answer_after_thinking_has_its_stop_tokens_logprobs_whole_and_streamed():
    client = TestClient(make_app(replies=["\nT.</think>"], reasoning_parser="deepseek_r1"))
    body = {"input": "hi", "top_logprobs": 1, "include": ["message.output_text.logprobs"]}
    whole = client.post("/v1/responses", json=body).json()
    streamed = events_of(client.post("/v1/responses", json={**body, "stream": True}).text)[-1]["response"]
    for reply in (whole, streamed):
        assert [i["type"] for i in reply["output"]] == ["reasoning", "message"]
        [part] = reply["output"][1]["content"]
        assert part["text"] == "" and len(part["logprobs"]) == 1  # the stop token's
    assert whole["output"][1]["content"] == streamed["output"][1]["content"]


def test_input_of_reasoning_items_alone_is_refused_by_name():
    r = TestClient(make_app()).post("/v1/responses", json={"input": [{"type": "reasoning", "id": "rs_1",
                                                                      "summary": []}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "no message or function call item" in r.json()["error"]["message"]


def test_a_reply_cut_while_thinking_is_its_reasoning_and_an_empty_message():
    client = TestClient(make_app(replies=["\nStill thinking about it"], reasoning_parser="deepseek_r1"))
    for stream in (False, True):
        r = client.post("/v1/responses", json={"input": "hi", "stream": stream})
        body = events_of(r.text)[-1]["response"] if stream else r.json()
        assert [i["type"] for i in body["output"]] == ["reasoning", "message"], stream
        assert body["output"][0]["content"][0]["text"] == "Still thinking about it"
        assert body["output"][1]["content"][0]["text"] == ""
        assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == body["usage"]["output_tokens"]


def test_return_tokens_as_token_ids_on_output_text_logprobs():
    app = make_app(replies=["\nHello there!"])
    r = TestClient(app).post("/v1/responses", json={"input": "hi", "top_logprobs": 1, "include": [
        "message.output_text.logprobs"], "return_tokens_as_token_ids": True})
    body = r.json()
    part = body["output"][0]["content"][0]
    assert part["text"] == "Hello there!" and len(part["logprobs"]) == body["usage"]["output_tokens"] - 1
    ids = small_tokenizer().encode("\nHello there!")[1:]  # the opening "\n" the text leaves out
    assert [lp["token"] for lp in part["logprobs"][:-1]] == [f"token_id:{t}" for t in ids]


def test_truncation_auto_is_taken_and_echoed():
    """The Agents SDK sends truncation "auto" (ModelSettings(truncation="auto")): OpenAI truncates only input
    over the context, which is a 400 here either way."""
    client = TestClient(make_app())
    r = client.post("/v1/responses", json={"input": "hi", "truncation": "auto"})
    assert r.status_code == 200 and r.json()["truncation"] == "auto"
    assert client.post("/v1/responses", json={"input": "hi"}).json()["truncation"] == "disabled"


CODEX_TOOLS = [
    TOOL,
    {"type": "custom", "name": "apply_patch", "description": "edit files",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "namespace", "name": "mcp_docs", "description": "docs server",
     "tools": [{"type": "function", "name": "search_docs", "parameters": {"type": "object"}}]},
    {"type": "web_search"}, {"type": "local_shell"}, {"type": "image_generation"},
]


@pytest.mark.parametrize("stream", [False, True])
def test_codexs_tools_custom_namespaced_and_hosted(stream):
    """A function, a custom tool (offered as a function of one string, `input`; its call a custom_tool_call, whose
    input the model may write as it is), a namespace's function (offered under `{namespace}.{name}`; its call
    names the namespace and the function), and tools this server cannot run, left out."""
    patch = "*** Begin Patch\n*** End Patch"
    replies = [f"apply_patch\n{patch}", 'mcp_docs.search_docs\n{"q": "x"}']
    app = make_app(replies=lambda call: [
        replies[0] if "patch" in small_tokenizer().decode(call.prompt_ids[-8:]) else replies[1]])
    client = TestClient(app)
    outputs = []
    for ask in ("patch it", "look it up"):
        r = client.post("/v1/responses", json={"input": ask, "tools": CODEX_TOOLS, "stream": stream})
        assert r.status_code == 200, r.text
        events = events_of(r.text) if stream else []
        outputs.append((events, events[-1]["response"] if stream else r.json()))
    prompt = small_tokenizer().decode(engine_of(app).calls[0].prompt_ids)
    assert all(f"## {name}" in prompt for name in ("get_weather", "apply_patch", "mcp_docs.search_docs"))
    assert "web_search" not in prompt and "local_shell" not in prompt
    assert '"input"' in prompt  # the custom tool's one argument
    (events, body), (_, other) = outputs
    [call] = body["output"]
    assert call["type"] == "custom_tool_call" and call["id"].startswith("ctc_") and call["status"] == "completed"
    assert (call["name"], call["input"]) == ("apply_patch", patch) and "arguments" not in call
    [namespaced] = other["output"]
    assert namespaced["type"] == "function_call" and namespaced["namespace"] == "mcp_docs"
    assert namespaced["name"] == "search_docs"
    assert body["tools"][3] == {"type": "web_search"}  # echoed as sent
    if stream:
        kinds = [e["type"] for e in events]
        assert "response.function_call_arguments.delta" not in kinds
        done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
        assert done["input"] == patch
        assert "".join(e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta") == patch


def test_a_custom_tools_call_and_output_sent_back_are_a_call_and_its_observation():
    app = make_app()
    items = [{"role": "user", "content": "patch it"},
             {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "diff"},
             {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"},
             {"type": "local_shell_call", "call_id": "c2", "action": {"type": "exec", "command": ["ls"]}},
             {"type": "local_shell_call_output", "call_id": "c2", "output": "a.txt"},
             {"type": "web_search_call", "id": "ws_1", "status": "completed"}]
    r = TestClient(app).post("/v1/responses", json={"input": items, "tools": CODEX_TOOLS})
    assert r.status_code == 200, r.text
    prompt = small_tokenizer().decode(engine_of(app).calls[0].prompt_ids)
    assert prompt.endswith("<|user|>\npatch it<|assistant|>apply_patch\ndiff<|observation|>\ndone<|assistant|>")
    assert "a.txt" not in prompt and "ls" not in prompt.split("<|user|>")[-1]


def test_images_and_files_in_the_input_are_a_line_saying_so():
    app = make_app()
    client = TestClient(app)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                          {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
             {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot see it."}]},
             {"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]
    r = client.post("/v1/responses", json={"input": items})
    assert r.status_code == 200, r.text
    prompt = small_tokenizer().decode(engine_of(app).calls[0].prompt_ids)
    assert ("<|user|>\nwhat is this?\n[an image left out: this model reads text only]<|assistant|>\n"
            "I cannot see it.<|user|>\n[a file left out: this model reads text only]<|assistant|>") in prompt
    listed = client.get(f"/v1/responses/{r.json()['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert listed[0]["content"][1] == {"type": "input_text", "text": "[an image left out: this model reads text only]"}
    assert listed[1]["content"] == [{"type": "output_text", "text": "I cannot see it.", "annotations": []}]


def test_allowed_tools_offers_only_those():
    app = make_app()
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "search_docs"}]}
    r = TestClient(app).post("/v1/responses", json={"input": "x", "tools": CODEX_TOOLS, "tool_choice": choice})
    assert r.status_code == 200, r.text
    call = engine_of(app).calls[0]
    prompt = small_tokenizer().decode(call.prompt_ids)
    assert "## mcp_docs.search_docs" in prompt and "## get_weather" not in prompt
    assert call.params.guided is not None  # required: a call is forced
    assert r.json()["tool_choice"] == choice


def test_input_tokens_counts_the_prompt_the_reply_would_get():
    app = make_app()
    client = TestClient(app)
    body = {"input": "weather in Paris?", "instructions": "be brief", "tools": [TOOL]}
    counted = client.post("/v1/responses/input_tokens", json=body)
    assert counted.status_code == 200
    reply = client.post("/v1/responses", json=body).json()
    assert counted.json() == {"object": "response.input_tokens", "input_tokens": reply["usage"]["input_tokens"]}
    assert len(engine_of(app).calls) == 1  # counting runs nothing
    assert client.post("/v1/responses/input_tokens", json={"input": "x", "model": "gpt-5"}).status_code == 404


def test_namespaces_scope_their_names_and_calls_sent_back_keep_theirs():
    """Two namespaces may both have a `search`: each is offered under its namespace's name, allowed_tools may name a
    namespace, and a call sent back with its namespace is shown to the model by that name and kept with it."""
    search = {"type": "function", "name": "search", "parameters": {"type": "object"}}
    tools = [{"type": "namespace", "name": "docs", "description": "d", "tools": [search]},
             {"type": "namespace", "name": "code", "description": "c", "tools": [search]},
             {"type": "web_search", "search_context_size": "high"}]
    app = make_app(replies=['code.search\n{"q": "x"}'])
    client = TestClient(app)
    items = [{"role": "user", "content": "find it"},
             {"type": "function_call", "call_id": "c1", "name": "search", "namespace": "docs", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "nothing"}]
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "namespace", "name": "code"}]}
    r = client.post("/v1/responses", json={"input": items, "tools": tools, "tool_choice": choice})
    assert r.status_code == 200, r.text
    prompt = small_tokenizer().decode(engine_of(app).calls[0].prompt_ids)
    assert "## code.search" in prompt and "## docs.search" not in prompt
    assert "<|assistant|>docs.search\n{}<|observation|>\nnothing" in prompt
    [call] = r.json()["output"]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "search", "code")
    assert r.json()["tools"][2] == {"type": "web_search", "search_context_size": "high"}
    listed = client.get(f"/v1/responses/{r.json()['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert listed[1]["namespace"] == "docs" and "namespace" not in listed[2]


def test_a_custom_tools_input_may_come_wrapped_in_its_one_argument():
    app = make_app(replies=['apply_patch\n{"input": "the patch"}'])
    r = TestClient(app).post("/v1/responses", json={"input": "x", "tools": CODEX_TOOLS})
    [call] = r.json()["output"]
    assert (call["type"], call["input"]) == ("custom_tool_call", "the patch")


def test_a_streamed_request_over_the_context_fails_in_the_stream_as_openai_reports_it():
    """Codex compacts its conversation on response.failed with context_length_exceeded: a streamed request whose
    input the context cannot hold gets that event (whole, it is still a 400)."""
    app = make_app(max_model_len=64)
    client = TestClient(app)
    body = {"input": "word " * 200, "stream": True}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200
    events = events_of(r.text)
    assert [e["type"] for e in events] == ["response.created", "error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "context_length_exceeded"
    assert failed["model"] == MODEL and failed["output"] == []
    assert client.post("/v1/responses", json={**body, "stream": False}).status_code == 400
    assert engine_of(app).calls == []


@pytest.mark.parametrize("tools, choice, param, says", [
    ([{"type": "namespace", "name": "n" * 40, "description": "", "tools": [{"type": "function", "name": "f" * 30}]}],
     None, "tools.0.tools.0.name", "longer than 64"),
    ([{"type": "namespace", "name": "my docs", "description": "", "tools": [TOOL]}], None, "tools.0.name", "pattern"),
    ([{"type": "namespace", "name": "a", "description": "", "tools": [TOOL]},
      {"type": "namespace", "name": "b", "description": "", "tools": [TOOL]}],
     {"type": "function", "name": "get_weather"}, "tool_choice", "2 namespaces"),
    ([TOOL], {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "namespace"}]}, "tool_choice.tools.0",
     "names no namespace"),
])
def test_tool_names_that_cannot_be_offered_or_choose_no_one_tool_are_a_400(tools, choice, param, says):
    body = {"input": "x", "tools": tools, **({"tool_choice": choice} if choice else {})}
    r = TestClient(make_app()).post("/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and says in r.json()["error"]["message"], r.text


def test_a_bare_name_chooses_the_tool_of_that_exact_name_before_a_namespaced_one():
    tools = [{"type": "namespace", "name": "d", "description": "", "tools": [TOOL]}, TOOL]
    app = make_app(replies=[CALL])
    r = TestClient(app).post("/v1/responses", json={"input": "x", "tools": tools,
                                                     "tool_choice": {"type": "function", "name": "get_weather"}})
    assert r.status_code == 200, r.text
    [call] = r.json()["output"]
    assert call["name"] == "get_weather" and "namespace" not in call


def test_a_custom_inputs_json_is_unwrapped_only_when_it_is_the_one_argument_and_empty_input_shows_as_it():
    app = make_app(replies=['apply_patch\n{"input": "a", "mode": "x"}'])
    client = TestClient(app)
    [call] = client.post("/v1/responses", json={"input": "x", "tools": CODEX_TOOLS}).json()["output"]
    assert call["input"] == '{"input": "a", "mode": "x"}'
    items = [{"role": "user", "content": "x"},
             {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": ""},
             {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"}]
    client.post("/v1/responses", json={"input": items, "tools": CODEX_TOOLS})
    prompt = small_tokenizer().decode(engine_of(app).calls[-1].prompt_ids)
    assert '<|assistant|>apply_patch\n{"input": ""}<|observation|>' in prompt


def test_a_stream_that_brings_no_event_is_kept_alive_with_in_progress_events():
    """A call under tool_choice auto is held until whole, and a long prefill brings nothing either: Codex drops a
    stream without events for its idle timeout (SSE comments are none), so at the ping interval the stream says
    response.in_progress again. Through the SDK with strict validation; and a client gone mid-wait frees all."""
    import openai

    from tests.api_fakes import served

    app = make_app(replies=[CALL], step_delay=0.05, sse_ping_seconds=0.02)
    with served(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, _strict_response_validation=True)
        events = list(client.responses.create(model=MODEL, input="weather?", tools=[TOOL], stream=True))
        kinds = [e.type for e in events]
        first_call = kinds.index("response.output_item.added")
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[2:first_call].count("response.in_progress") == first_call - 2 >= 3  # beats while held
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].type == "response.completed" and events[-1].response.output[0].name == "get_weather"
        with client.responses.create(model=MODEL, input="weather?", tools=[TOOL], stream=True) as stream:
            for event in stream:
                if event.sequence_number == 6:  # a beat: the engine is mid-reply
                    break
    wait_idle(engine_of(app))


def test_keep_alive_beats_only_after_every_event_made_before_them_and_never_hangs():
    """A beat takes the next sequence number when it is made: never while events made before it wait in the
    queue (an event and the timer in one loop round); and an inner stream that dies of anything ends the stream."""
    import asyncio

    from glm4serve.api.streaming import keep_alive

    async def numbered() -> list[int]:
        made = iter(range(1000))

        async def inner():
            yield next(made)
            await asyncio.sleep(0.05)  # ends as the beat's timer fires
            for _ in range(3):
                yield next(made)

        return [n async for n in keep_alive(inner(), 0.05, lambda: next(made))]

    async def dies():
        yield b"x"
        raise asyncio.CancelledError()  # not the pump's own cancel

    async def main():
        for _ in range(20):
            got = await numbered()
            assert got == sorted(got)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.ensure_future(_drain(keep_alive(dies(), 0.01, lambda: b"beat"))), 2)

    async def _drain(stream):
        return [e async for e in stream]

    asyncio.run(main())
