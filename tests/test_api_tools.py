"""Tool calls through /v1/chat/completions: parsed whole and streamed, forced by tool_choice."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from glm4serve.chat.tool_parser import CALL_MARK
from glm4serve.engine.types import GuidedSpec
from server_proc import without_model_name
from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    engine_of,
    make_app,
    shutdown_engines,
    small_tokenizer,
    sse_json,
    wait_idle,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
ASK = [{"role": "user", "content": "weather in Paris?"}]
CALL = 'get_weather\n{"city": "Paris"}'


def run(replies, stream=False, **body):
    app = make_app(replies=replies)
    r = TestClient(app).post("/v1/chat/completions", json={
        "messages": ASK, "tools": TOOLS, "stream": stream, **body})
    assert r.status_code == 200, r.text
    return engine_of(app), (sse_json(r.text) if stream else r.json())


def calls_from_stream(chunks, index=0):
    """Accumulate streamed tool calls the way the SDK's stream helper does."""
    calls: dict[int, dict] = {}
    content = None
    for c in chunks:
        for ch in c["choices"]:
            if ch["index"] != index:
                continue
            delta = ch["delta"]
            if delta.get("content"):
                content = (content or "") + delta["content"]
            for tc in delta.get("tool_calls", []):
                slot = calls.setdefault(tc["index"], {"starts": 0, "name": "", "arguments": ""})
                if "id" in tc:
                    slot["starts"] += 1
                    slot["id"] = tc["id"]
                    assert tc["type"] == "function" and tc["function"]["arguments"] == ""
                    slot["name"] += tc["function"]["name"]
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    slot["arguments"] += tc["function"]["arguments"]
    return [calls[k] for k in sorted(calls)], content


def test_whole_tool_call():
    engine, body = run([CALL])
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tc] = choice["message"]["tool_calls"]
    assert tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"]["name"] == "get_weather" and json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
    params = engine.calls[0].params
    # the <|assistant|> token between calls reaches the parser as its mark, not as text
    assert params.special_token_text == {small_tokenizer().special_tokens["<|assistant|>"]: CALL_MARK}
    prompt = small_tokenizer().decode(engine.calls[0].prompt_ids)
    assert prompt.startswith("[gMASK]<sop><|system|>\n") and "## get_weather" in prompt and "## get_time" in prompt


def test_whole_two_calls_get_their_own_ids():
    _, body = run([CALL + '<|assistant|>get_time\n{}'])
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["id"] != calls[1]["id"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_tool_call_sends_name_once_then_its_arguments():
    _, chunks = run([CALL + '<|assistant|>get_time\n{}'], stream=True)
    calls, content = calls_from_stream(chunks)
    assert content is None
    assert [(c["starts"], c["name"]) for c in calls] == [(1, "get_weather"), (1, "get_time")]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"} and json.loads(calls[1]["arguments"]) == {}
    assert calls[0]["id"] != calls[1]["id"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls",
                                        "stop_reason": None}


def test_truncated_call_finishes_with_length():
    n_tokens = len(small_tokenizer().encode(CALL)) - 2  # cut inside the arguments
    _, body = run([CALL], max_tokens=n_tokens)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    [tc] = choice["message"]["tool_calls"]
    tok = small_tokenizer()
    partial_args = tok.decode(tok.encode(CALL)[:n_tokens]).partition("\n")[2].strip()
    assert partial_args and partial_args != '{"city": "Paris"}'
    assert tc["function"] == {"name": "get_weather", "arguments": partial_args}
    _, chunks = run([CALL], stream=True, max_tokens=n_tokens)
    calls, _ = calls_from_stream(chunks)
    assert (calls[0]["name"], calls[0]["arguments"]) == ("get_weather", partial_args)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_plain_reply_with_tools_is_content_without_special_text():
    _, body = run(["\nIt is<|assistant|> sunny."])
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "It is sunny.", "tool_calls": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    _, chunks = run(["\nIt is<|assistant|> sunny."], stream=True)
    calls, content = calls_from_stream(chunks)
    assert calls == [] and content == "It is sunny."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_special_token_text_written_as_ordinary_tokens_is_text():
    # The model spells "<|assistant|>" / "<|user|>" with ordinary tokens: only the special token
    # separates calls, and no text is taken out of a reply.
    tok = small_tokenizer()
    call = tok.encode('search\n{"q": "what does <|assistant|> mean"}', allow_special=False)
    assert tok.special_tokens["<|assistant|>"] not in call
    plain = tok.encode("\nType <|user|> or <|assistant|> here", allow_special=False)
    tools = TOOLS + [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    for stream in (False, True):
        _, body = run([call], stream=stream, tools=tools)
        if stream:
            calls, content = calls_from_stream(body)
            assert content is None and body[-1]["choices"][0]["finish_reason"] == "tool_calls"
        else:
            calls, content = body["choices"][0]["message"]["tool_calls"], body["choices"][0]["message"]["content"]
            calls = [c["function"] for c in calls]
            assert content is None and body["choices"][0]["finish_reason"] == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [("search", '{"q": "what does <|assistant|> mean"}')]
        _, body = run([plain], stream=stream, tools=tools)
        content = calls_from_stream(body)[1] if stream else body["choices"][0]["message"]["content"]
        assert content == "Type <|user|> or <|assistant|> here"


def test_broken_call_is_the_same_text_streamed_or_whole():
    # A first line that names a tool, then no JSON object: plain text by GLM-4's rule, both ways.
    for reply in ['get_weather\n{"city": Paris}', CALL + "\nI called it.", CALL + "<|assistant|>\nthen text"]:
        _, body = run([reply])
        choice = body["choices"][0]
        assert choice["message"]["tool_calls"] is None and choice["finish_reason"] == "stop"
        _, chunks = run([reply], stream=True)
        calls, content = calls_from_stream(chunks)
        assert calls == [] and content == choice["message"]["content"]
        assert content == reply.replace("<|assistant|>", "")
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_named_tool_choice_is_enforced_by_a_grammar_not_a_prompt_prefix():
    forced = {"type": "function", "function": {"name": "get_time"}}
    engine, body = run(['get_time\n{"tz": "UTC"}'], tool_choice=forced)
    call = engine.calls[0]
    assert small_tokenizer().decode(call.prompt_ids).endswith("<|assistant|>")  # nothing prefilled
    assert call.params.guided == GuidedSpec.tool_call({"get_time": TOOLS[1]["function"]["parameters"]})
    assert call.params.logit_bias is None
    [tc] = body["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["name"] == "get_time" and json.loads(tc["function"]["arguments"]) == {"tz": "UTC"}
    # streamed, the name is announced once
    _, chunks = run(['get_time\n{"tz": "UTC"}'], stream=True, tool_choice=forced)
    calls, content = calls_from_stream(chunks)
    assert content is None and [(c["starts"], c["name"]) for c in calls] == [(1, "get_time")]
    assert json.loads(calls[0]["arguments"]) == {"tz": "UTC"}


@pytest.mark.parametrize("parameters", [None, {}])
def test_a_forced_function_without_parameters_is_called_with_none(parameters):
    from xgrammar.testing import _is_grammar_accept_string

    from glm4serve.engine.guided import build_grammar

    now = {"type": "function", "function": {"name": "now", **({} if parameters is None else {"parameters": {}})}}
    for tool_choice in ("required", {"type": "function", "function": {"name": "now"}}):
        engine, body = run(["now\n{}"], tools=[now], tool_choice=tool_choice)
        assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
        grammar = build_grammar(engine.calls[0].params.guided)
        assert _is_grammar_accept_string(grammar, "now\n{}")
        assert not _is_grammar_accept_string(grammar, 'now\n{"at": "noon"}')


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_in_its_name_has_neither_call_nor_content(stream):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    _, body = run([CALL], stream=stream, tool_choice=forced, max_tokens=1)
    if stream:
        calls, content = calls_from_stream(body)
        assert (calls, content) == ([], None) and body[-1]["choices"][0]["finish_reason"] == "length"
    else:
        choice = body["choices"][0]
        assert choice["message"]["tool_calls"] in (None, []) and not choice["message"]["content"]
        assert choice["finish_reason"] == "length"


def test_forced_call_with_broken_json_is_still_a_call():
    # the grammar keeps the JSON whole; a stop string can still cut it
    _, body = run(['get_time\n{"tz": "UTC"}'], tool_choice={"type": "function", "function": {"name": "get_time"}},
                  stop=["UTC"])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"  # a named tool_choice's call (test below)
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"tz": "'}


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_a_named_function_finishes_stop_as_openai_and_vllm_do(stream):
    """OpenAI's API (and vLLM after it): "tool_calls" for auto and required, "stop" when tool_choice named it."""
    for tool_choice, reason in (("auto", "tool_calls"), ("required", "tool_calls"),
                                ({"type": "function", "function": {"name": "get_weather"}}, "stop")):
        _, body = run([CALL], stream=stream, tool_choice=tool_choice)
        if stream:
            calls, _ = calls_from_stream(body)
            assert [c["name"] for c in calls] == ["get_weather"]
            assert body[-1]["choices"][0]["finish_reason"] == reason, tool_choice
        else:
            assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
            assert body["choices"][0]["finish_reason"] == reason, tool_choice


def test_required_puts_every_tool_in_one_grammar_and_runs_the_engine_once():
    engine, body = run(['get_weather\n{"city": "Paris"}'], tool_choice="required")
    [call] = engine.calls
    assert call.params.guided == GuidedSpec.tool_call({t["function"]["name"]: t["function"]["parameters"]
                                                       for t in TOOLS},
                                                      call_separator=small_tokenizer().special_tokens["<|assistant|>"])
    assert [name for name, _ in call.params.guided.tools] == ["get_weather", "get_time"]
    [tc] = body["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True])
def test_required_may_make_several_calls_as_glm4_writes_them(stream):
    """After a whole call the grammar of tool_choice required also allows `<|assistant|>`, with which GLM-4
    starts another call of the same reply (vLLM's required may make several too); a named function is called
    once, and parallel_tool_calls false keeps required to one."""
    two = CALL + '<|assistant|>get_time\n{"tz": "UTC"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    for body, names in (({"tool_choice": "required"}, ["get_weather", "get_time"]),
                        ({"tool_choice": "required", "parallel_tool_calls": False}, ["get_weather"]),
                        ({"tool_choice": named}, ["get_weather"])):
        _, reply = run([two], stream=stream, **body)
        if stream:
            calls, content = calls_from_stream(reply)
            got = [(c["name"], c["arguments"], c["starts"]) for c in calls]
        else:
            message = reply["choices"][0]["message"]
            content = message["content"]
            got = [(c["function"]["name"], c["function"]["arguments"], 1) for c in message["tool_calls"]]
        args = {"get_weather": '{"city": "Paris"}', "get_time": '{"tz": "UTC"}'}
        assert got == [(name, args[name], 1) for name in names], body
        assert not content


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_a_replys_first_call_alone(stream):
    """As vLLM: the flag limits the calls returned. The reply ends where its opening call is whole and another
    begins; one that opens with no call, or an `<|assistant|>` in the thinking, is read as without the flag."""
    def message_of(reply: str, max_tokens: int | None = None, **extra) -> dict:
        app = make_app(replies=[reply], **extra)
        r = TestClient(app).post("/v1/chat/completions", json={
            "messages": ASK, "tools": TOOLS, "stream": stream, "parallel_tool_calls": False, "max_tokens": max_tokens,
            **({"stream_options": {"include_usage": True}} if stream else {})})
        assert not engine_of(app).calls[0].params.stop_token_ids
        finishes = re.findall(r"request_success_total\{finished_reason=\"(\w+)\"\} (\S+)",
                              without_model_name(TestClient(app).get("/metrics").text))
        assert [(reason, float(count)) for reason, count in finishes if float(count)] in (
            [("stop", 1.0)], [("length", 1.0)]), finishes  # a reply ended at its first call is no 'abort'
        if not stream:
            return {**r.json()["choices"][0], "tokens": r.json()["usage"]["completion_tokens"]}
        calls, content = calls_from_stream(sse_json(r.text))
        deltas = [c["choices"][0] for c in sse_json(r.text) if c["choices"]]
        thinking = "".join(d["delta"].get("reasoning") or "" for d in deltas) or None
        tool_calls = [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls] or None
        tokens = sse_json(r.text)[-1]["usage"]["completion_tokens"]
        return {"message": {"content": content, "tool_calls": tool_calls, "reasoning": thinking},
                "finish_reason": deltas[-1]["finish_reason"], "tokens": tokens}

    def names(choice: dict) -> list[str]:
        return [c["function"]["name"] for c in choice["message"]["tool_calls"] or ()]

    first_call_tokens = len(small_tokenizer().encode(CALL + "<|assistant|>"))
    two_calls = message_of(CALL + '<|assistant|>get_time\n{}')
    assert names(two_calls) == ["get_weather"] and two_calls["finish_reason"] == "tool_calls"
    assert two_calls["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert not two_calls["message"]["content"]
    assert two_calls["tokens"] == first_call_tokens  # the second call was not generated
    for max_tokens in (None, first_call_tokens):  # the separator alone, or cut by max_tokens there
        cut_second = message_of(CALL + '<|assistant|>get_ti', max_tokens)
        assert names(cut_second) == ["get_weather"] and cut_second["finish_reason"] == "tool_calls"
    text_first = message_of("\nLet me look.<|assistant|>" + CALL)  # no call opens it: all text, as ever
    assert (text_first["message"]["content"], names(text_first)) == ("Let me look." + CALL, [])
    thought = message_of("Paris<|assistant|>, then.</think>" + CALL, reasoning_parser="deepseek_r1")
    assert names(thought) == ["get_weather"] and thought["message"]["reasoning"] == "Paris, then."


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_stops_decoding_a_choice_whose_call_ended_while_its_sibling_goes_on(stream):
    """n=2: choice 0's reply ends at its first call while choice 1 still writes its call's arguments. Choice 0
    stops decoding there (its KV blocks freed), not when its sibling ends; each gets its own call."""
    first = CALL + "<|assistant|>"
    long_args = 'get_weather\n{"city": "' + "Paris " * 30 + '"}'
    app = make_app(replies=[first + 'get_time\n{"tz": "' + "UTC " * 30 + '"}', long_args], step_delay=0.01)
    r = TestClient(app).post("/v1/chat/completions", json={
        "messages": ASK, "tools": TOOLS, "stream": stream, "parallel_tool_calls": False, "n": 2,
        **({"stream_options": {"include_usage": True}} if stream else {})})
    assert r.status_code == 200, r.text
    engine = engine_of(app)
    wait_idle(engine)
    if stream:
        chunks = sse_json(r.text)
        got = [[(c["name"], c["arguments"]) for c in calls_from_stream(chunks, i)[0]] for i in (0, 1)]
        finish = {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]}
        usage = chunks[-1]["usage"]
    else:
        choices = r.json()["choices"]
        got = [[(c["function"]["name"], c["function"]["arguments"]) for c in ch["message"]["tool_calls"]]
               for ch in choices]
        finish = {ch["index"]: ch["finish_reason"] for ch in choices}
        usage = r.json()["usage"]
    assert got == [[("get_weather", '{"city": "Paris"}')], [("get_weather", '{"city": "' + "Paris " * 30 + '"}')]]
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    tokenizer, request_id = small_tokenizer(), engine.calls[0].request_id
    first_tokens, long_tokens = len(tokenizer.encode(first)), len(tokenizer.encode(long_args))
    assert usage["completion_tokens"] == first_tokens + long_tokens + 1  # choice 1's with its stop token
    assert engine.aborted[0] == (request_id, 0)  # (the reader's early leave then aborts the finished request)
    decoded = engine.runner.decoded
    assert decoded[request_id, 1] == long_tokens  # the row of its last token gave the stop token
    # its last fed token is the one before `<|assistant|>`, or a few past it (the API reads outputs while the
    # engine steps on), where without end_choice it went on for its sibling's ~90 steps more
    assert first_tokens - 1 <= decoded[request_id, 0] < first_tokens + 20, (decoded, first_tokens)
    # /metrics counts both choices as stopped, as the client got them, not choice 0 as the engine's 'abort'
    text = without_model_name(TestClient(app).get("/metrics").text)
    assert 'glm4serve:request_success_total{finished_reason="stop"} 2.0' in text
    assert 'finished_reason="abort"' not in text


def test_tool_choice_none_shows_the_tools_and_parses_no_call():
    """As vLLM: the prompt is the one tool_choice auto renders, and a reply is content whatever it says."""
    engine, body = run([CALL], tool_choice="none")
    auto, _ = run([CALL], tool_choice="auto")
    assert engine.calls[0].params.special_token_text is None
    assert engine.calls[0].prompt_ids == auto.calls[0].prompt_ids
    assert "get_weather" in small_tokenizer().decode(engine.calls[0].prompt_ids)
    assert body["choices"][0]["message"]["tool_calls"] is None
    assert body["choices"][0]["message"]["content"] == CALL


def test_tool_choice_none_leaves_the_tools_out_with_the_vllm_flag():
    app = make_app(replies=[CALL], exclude_tools_when_tool_choice_none=True)
    r = TestClient(app).post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "tool_choice": "none"})
    assert "get_weather" not in small_tokenizer().decode(engine_of(app).calls[0].prompt_ids)
    assert r.json()["choices"][0]["message"]["content"] == CALL


def test_echo_stays_before_a_reply_that_calls_a_tool_whole_as_streamed():
    """vLLM's chat echo: the last assistant message's text opens the reply, a call's too."""
    messages = ASK + [{"role": "assistant", "content": "Well,"}]
    _, whole = run([CALL], messages=messages, echo=True, add_generation_prompt=False)
    _, chunks = run([CALL], stream=True, messages=messages, echo=True, add_generation_prompt=False)
    message = whole["choices"][0]["message"]
    [call] = message["tool_calls"]
    assert message["content"] == "Well," and call["function"]["name"] == "get_weather"
    streamed_calls, streamed_content = calls_from_stream(chunks)
    assert streamed_content == "Well," and [c["name"] for c in streamed_calls] == ["get_weather"]


def test_a_tool_renders_as_the_client_wrote_it():
    """GLM-4's template dumps the function object into the prompt as it comes (as transformers renders
    a client's tools): its keys' order, a null and a key of the client's own stay as they are; /tokenize
    counts the same prompt."""
    function = {"description": None, "name": "get_time", "parameters": {"type": "object"}, "x-examples": [{}]}
    tools = [{"type": "function", "function": function}]
    engine, _ = run(["\nNoon."], tools=tools)
    prompt = small_tokenizer().decode(engine.calls[0].prompt_ids)
    assert "## get_time\n\n" + json.dumps(function, ensure_ascii=False, indent=4) + "\n" in prompt
    app = make_app()
    r = TestClient(app).post("/tokenize", json={"messages": ASK, "tools": tools})
    assert r.json()["tokens"] == engine.calls[0].prompt_ids


def test_history_with_tool_call_and_result_renders():
    engine, _ = run(["\nSunny."], messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}])
    prompt = small_tokenizer().decode(engine.calls[0].prompt_ids)
    assert prompt.endswith('<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"sky": "clear"}<|assistant|>')


def test_a_forced_calls_arguments_stream_as_the_model_writes_them():
    """Under tool_choice required or named (a grammar writes the call) the call is sure from its name line, so its
    arguments stream token by token, as instructor's partial objects read them; auto still decides at the end."""
    for tool_choice, pieces in (("required", "many"), ("auto", "one")):
        _, chunks = run([CALL], stream=True, tool_choice=tool_choice)
        fragments = [tc["function"]["arguments"] for c in chunks for ch in c["choices"]
                     for tc in ch["delta"].get("tool_calls") or [] if tc["function"].get("arguments")]
        assert "".join(fragments) == '{"city": "Paris"}'
        assert (len(fragments) > 3) if pieces == "many" else (len(fragments) == 1), tool_choice
        calls, _ = calls_from_stream(chunks)
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Paris"}')]
