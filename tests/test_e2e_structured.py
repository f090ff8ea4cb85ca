"""Structured output end to end: the real server (uvicorn subprocess, our engine, a random-weight
GLM-4 that otherwise emits noise) and the official openai client with strict response validation."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_proc import ServerProcess

MODEL = "glm4-structured"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pets": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"enum": [3, 4]}},
            "required": ["kind"]}},
        "home": {"type": "object", "properties": {"city": {"enum": ["Paris", "北京"]}}, "required": ["city"]},
    },
    "required": ["name", "age", "home"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Lima"]}, "days": {
            "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def person_format(schema=PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(make_checkpoint):
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--served-model-name", MODEL).wait_healthy()
    yield s
    s.stop()


def client(s: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, _strict_response_validation=True)


def test_json_schema_replies_validate_whole_and_with_n2(server):
    c = client(server)
    for seed in range(4):
        r = c.chat.completions.create(model=MODEL, messages=ASK, response_format=person_format(), seed=seed,
                                      temperature=1.0, n=2, max_tokens=300)
        assert len(r.choices) == 2
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch
            jsonschema.validate(json.loads(ch.message.content), PERSON)
        assert r.usage.completion_tokens > 0


def test_json_schema_streamed_concatenates_to_valid_json(server):
    stream = client(server).chat.completions.create(model=MODEL, messages=ASK, response_format=person_format(),
                                                    seed=11, temperature=1.0, max_tokens=300, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(pieces)), PERSON)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: Literal[3, 4]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)
    pets: list[Pet] = Field(max_length=2)


def test_sdk_parse_helper_gets_a_parsed_pydantic_object(server):
    # the SDK turns the model into a strict json_schema request and parses the reply itself
    r = client(server).chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, seed=5,
                                              temperature=1.0, max_tokens=300)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 99 and len(person.pets) <= 2


def test_responses_api_parse_helper_and_a_required_call(server):
    c = client(server)
    r = c.responses.parse(model=MODEL, input=ASK, text_format=Person, temperature=1.0, max_output_tokens=300,
                          extra_body={"seed": 5})  # seed: our extension, as vLLM's
    assert isinstance(r.output_parsed, Person) and 0 <= r.output_parsed.age <= 99
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    for seed in range(2):
        r = c.responses.create(model=MODEL, input=ASK, tools=flat, tool_choice="required", extra_body={"seed": seed},
                               temperature=1.0, max_output_tokens=100)
        assert r.output and r.status == "completed"
        for call in r.output:  # one call, or several (GLM-4's `<|assistant|>` between them)
            assert call.type == "function_call"
            jsonschema.validate(json.loads(call.arguments), SCHEMA_OF[call.name])


def test_json_object_replies_are_objects(server):
    def token_id(text):
        ids = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text,
                                                         "add_special_tokens": False}).json()["tokens"]
        assert len(ids) == 1
        return ids[0]

    quote, brace = token_id('"'), token_id("}")
    # A random model would write one key for ever; a nudge towards `"` and `}` lets it finish.
    # The grammar still decides where they may go.
    for seed in range(4):
        r = client(server).chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                                   seed=seed, temperature=1.0, max_tokens=500,
                                                   logit_bias={str(quote): 5, str(brace): 5})
        ch = r.choices[0]
        assert ch.finish_reason == "stop"
        assert isinstance(json.loads(ch.message.content), dict)


def test_max_tokens_cut_is_length_whole_and_streamed(server):
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=ASK, response_format=person_format(), max_tokens=4,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    # the first required property comes first; the leading "\n" the grammar allows is stripped
    assert '{"name": '.startswith(r.choices[0].message.content) and len(r.choices[0].message.content) >= 2
    finishes = [ch.choices[0].finish_reason for ch in c.chat.completions.create(
        model=MODEL, messages=ASK, response_format=person_format(), max_tokens=4, temperature=0, stream=True)]
    assert finishes[-1] == "length"


def test_completions_response_format(server):
    r = client(server).completions.create(model=MODEL, prompt="A person:", max_tokens=300, seed=3, n=2,
                                          extra_body={"response_format": person_format()})
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.text), PERSON)  # no leading newline for completions


def check_call(call) -> str:
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    return call.function.name


def test_tool_choice_required_always_gives_a_valid_call(server):
    names = set()
    for seed in range(8):
        r = client(server).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                   seed=seed, temperature=1.0, max_tokens=100)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        names.update(check_call(call) for call in ch.message.tool_calls)  # one call, or several
    assert names == {"get_weather", "get_time"}  # the model chooses among the tools


def test_tool_choice_required_streamed_through_the_sdk_stream_helper(server):
    for seed in range(3):
        with client(server).chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                    seed=seed, temperature=1.0, max_tokens=100) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        ch = final.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
        for call in ch.message.tool_calls:
            check_call(call)


def test_named_tool_choice_whole_and_streamed_with_n2(server):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=forced, n=2, seed=1,
                                  temperature=1.0, max_tokens=100)
    for ch in r.choices:
        assert ch.finish_reason == "stop"  # a named function's call, as OpenAI's API
        assert [check_call(call) for call in ch.message.tool_calls] == ["get_weather"]
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    finishes = {}
    for chunk in c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=forced, n=2, seed=2,
                                           temperature=1.0, max_tokens=100, stream=True):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                names[ch.index] = names.get(ch.index, "") + (tc.function.name or "")
                args[ch.index] = args.get(ch.index, "") + (tc.function.arguments or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "stop", 1: "stop"} and names == {0: "get_weather", 1: "get_weather"}
    for a in args.values():
        jsonschema.validate(json.loads(a), SCHEMA_OF["get_weather"])


@pytest.mark.parametrize("stream", [False, True])
def test_bad_and_uncompilable_schemas_are_400(server, stream):
    c = client(server)
    cases = [
        (person_format({"type": "object", "properties": {"a": {"type": "strnig"}}}), "not a valid JSON Schema"),
        (person_format({"type": "integer", "minimum": 5, "maximum": 1}), "cannot compile"),
        (person_format({"type": "string", "pattern": "(?<=a)b"}), "lookaround"),
        (person_format({"type": "string", "pattern": "(a)\\1"}), "cannot compile"),  # a backreference
    ]
    for fmt, reason in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=5, stream=stream)
        assert reason in e.value.message and e.value.param.startswith("response_format")
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 2}}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, tools=bad_tool, tool_choice="required", stream=stream)
    assert "cannot compile" in e.value.message and e.value.param == "tools"
    assert httpx.get(server.url + "/health").status_code == 200


def test_vllm_guided_choice_and_regex_through_the_sdk(server):
    """vLLM's extra_body constraints, as its users send them: every reply is one of the choices, or
    matches the pattern, whole and streamed."""
    c = client(server)
    choices = ["positive", "negative", "neutral"]
    seen = set()
    for seed in range(6):
        r = c.chat.completions.create(model=MODEL, messages=ASK, seed=seed, max_tokens=20,
                                      extra_body={"guided_choice": choices})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content in choices
        seen.add(r.choices[0].message.content)
    assert len(seen) > 1
    pattern = r"[0-9]{3}-[0-9]{4}"
    r = c.completions.create(model=MODEL, prompt="Phone:", seed=1, max_tokens=20, n=2,
                             extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, ch.text) and ch.finish_reason == "stop" for ch in r.choices)
    stream = c.chat.completions.create(model=MODEL, messages=ASK, seed=2, max_tokens=20, stream=True,
                                       extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
