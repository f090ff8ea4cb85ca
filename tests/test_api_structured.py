"""response_format and forced tool_choice at the API (the real engine over a scripted model runner):
which grammar each request hands the engine, and the 400s for schemas that cannot be used. The
engine applies the grammar, so every scripted reply here is one the grammar allows."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from glm4serve.engine.types import GuidedSpec
from tests.api_fakes import engine_of, make_app, shutdown_engines, sse_json  # noqa: F401 - autouse fixture

HI = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}}, "required": ["b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: none taken
]


def post(path, body, replies=("\n{}",)):
    app = make_app(replies=list(replies))
    r = TestClient(app).post(path, json=body)
    return engine_of(app), r


def json_schema_format(schema, **extra):
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, **extra}}


@pytest.mark.parametrize("fmt,spec", [
    ({"type": "json_object"}, GuidedSpec.json_object(leading_newline=True)),
    (json_schema_format(SCHEMA, strict=True), GuidedSpec.json_schema(SCHEMA, leading_newline=True)),
    ({"type": "json_schema", "json_schema": {"name": "any"}}, GuidedSpec.json_object(leading_newline=True)),
    ({"type": "text"}, None),
])
def test_chat_response_format_becomes_the_engine_grammar(fmt, spec):
    engine, r = post("/v1/chat/completions", {"messages": HI, "response_format": fmt})
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.guided == spec


def test_chat_json_reply_loses_its_leading_newline_whole_and_streamed():
    reply = '\n{"b": 1, "a": "x"}'
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(SCHEMA)}, [reply])
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"b": 1, "a": "x"}
    assert r.json()["choices"][0]["message"]["content"] == reply[1:]
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(SCHEMA),
                                         "stream": True}, [reply])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(r.text) if c["choices"])
    assert text == reply[1:]


def test_schema_property_order_is_kept_for_generation():
    engine, _ = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(SCHEMA)})
    assert list(json.loads(engine.calls[0].params.guided.schema)["properties"]) == ["b", "a"]


def test_without_a_generation_prompt_the_json_starts_right_away():
    engine, _ = post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"},
                                              "add_generation_prompt": False})
    assert engine.calls[0].params.guided == GuidedSpec.json_object(leading_newline=False)


def test_completions_response_format_has_no_leading_newline():
    engine, r = post("/v1/completions", {"prompt": ["a", "b"], "response_format": json_schema_format(SCHEMA)},
                     ['{"b": 2}'])
    assert r.status_code == 200, r.text
    assert [c.params.guided for c in engine.calls] == [GuidedSpec.json_schema(SCHEMA)] * 2
    assert [c["text"] for c in r.json()["choices"]] == ['{"b": 2}'] * 2


@pytest.mark.parametrize("choice,names", [
    ("required", ["get_weather", "get_time"]),
    ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
])
def test_forced_tool_choice_becomes_a_tool_call_grammar(choice, names):
    engine, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": choice},
                     ["get_time\n{}"])
    assert r.status_code == 200, r.text
    spec = engine.calls[0].params.guided
    assert spec.kind == "tool_call" and [n for n, _ in spec.tools] == names
    assert json.loads(dict(spec.tools)["get_time"]) == {"type": "object", "properties": {}}  # it has no parameters
    # a named function's call finishes "stop", as in OpenAI's API
    assert r.json()["choices"][0]["finish_reason"] == ("tool_calls" if choice == "required" else "stop")


def test_auto_and_none_stay_unconstrained():
    for choice in ("auto", "none"):
        engine, _ = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": choice})
        assert engine.calls[0].params.guided is None


def error(r, param):
    assert r.status_code == 400, r.text
    body = r.json()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param
    return body["message"]


def test_invalid_schemas_are_400_saying_what_is_wrong():
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}
    engine, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(bad)})
    message = error(r, "response_format.json_schema.schema")
    assert "'zero' is not of type 'number'" in message and "properties/n/minimum" in message
    _, r = post("/v1/completions", {"prompt": "x", "response_format": json_schema_format({"type": "nope"})})
    assert "not a valid JSON Schema" in error(r, "response_format.json_schema.schema")
    for draft in (5, [], {}, True):  # looked up as the draft's URI, a $schema of another type is no draft
        _, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format({"$schema": draft})})
        assert "$schema must be a string" in error(r, "response_format.json_schema.schema")
        _, r = post("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"$schema": draft, "type": "object"}}}], "tool_choice": "none"})
        assert "$schema must be a string" in error(r, "tools.0.function.parameters")
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema"}})
    error(r, "response_format")
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "yaml"}})
    error(r, "response_format.type")
    assert engine.calls == []


def test_a_tools_invalid_parameters_schema_is_400_whatever_the_tool_choice():
    tools = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                     "required": "x"}}}]
    for choice in ["required", "auto", "none"]:
        _, r = post("/v1/chat/completions", {"messages": HI, "tools": tools, "tool_choice": choice})
        assert "not a valid JSON Schema" in error(r, "tools.1.function.parameters")
    for _ in range(2):  # the second check of the valid schema comes from the cache
        _, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": "auto"})
        assert r.status_code == 200


def test_schemas_are_checked_off_the_event_loop(monkeypatch):
    """A schema's check against its meta-schema takes ~1.5 us a byte in Python: 128 large tools held the
    event loop, /health included, for tens of seconds. Each is checked in a worker thread."""
    import asyncio
    import threading

    from glm4serve.api import json_checks

    where, check = [], json_checks._check_schema

    def recording(schema):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append(threading.current_thread().name.split("_")[0])
        return check(schema)

    monkeypatch.setattr(json_checks, "_check_schema", recording)
    json_checks._check_schema_text.cache_clear()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 7}}}
    for path, body in (("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": "auto"}),
                       ("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(schema)}),
                       ("/v1/completions", {"prompt": "x", "guided_json": {**schema, "title": "t"}}),
                       ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                                                             "schema": {**schema, "title": "u"}}}})):
        _, r = post(path, body)
        assert r.status_code == 200, r.text
    assert where and set(where) == {"schema-check"}, where  # not the default pool, which tokenizes prompts


def test_a_forced_tools_parameters_must_be_enforceable_and_a_free_ones_need_not():
    unheld = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}
    tools = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": unheld}}]
    for extra in ({"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}},
                  {"tool_choice": "auto", "response_format": {"type": "json_object"}}):  # a call or the format
        _, r = post("/v1/chat/completions", {"messages": HI, "tools": tools, **extra})
        assert "cannot enforce" in error(r, "tools.1.function.parameters")
    for extra in ({"tool_choice": "auto"}, {"tool_choice": "none", "response_format": {"type": "json_object"}},
                  {"tool_choice": {"type": "function", "function": {"name": TOOLS[0]["function"]["name"]}}}):
        _, r = post("/v1/chat/completions", {"messages": HI, "tools": tools, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_a_forced_call_leaves_response_format_for_a_later_turn_but_vllm_constraints_conflict():
    """As OpenAI's API: the format is the final answer's, the forced call this reply's."""
    engine, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": "required",
                                              "response_format": {"type": "json_object"}}, ["get_time\n{}"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    spec = engine.calls[0].params.guided
    assert spec.kind == "tool_call" and spec.otherwise is None
    _, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": "required",
                                         "guided_json": {"type": "object"}})
    assert "tool_choice" in error(r, "guided_json")


def test_tool_choice_auto_with_a_response_format_allows_a_call_or_the_format():
    """An agent with tools and a structured final answer (the Agents SDK's output_type, LangChain's
    bind_tools(response_format=...)): the reply may still call a tool."""
    fmt = json_schema_format({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    for reply, calls, content in (("get_time\n{}", ["get_time"], None), ('\n{"a": 1}', None, '{"a": 1}')):
        engine, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "response_format": fmt}, [reply])
        spec = engine.calls[0].params.guided
        assert spec.kind == "tool_call" and [n for n, _ in spec.tools] == ["get_weather", "get_time"]
        assert spec.otherwise.kind == "json_schema" and spec.otherwise.leading_newline
        message = r.json()["choices"][0]["message"]
        assert ([c["function"]["name"] for c in message["tool_calls"] or []] or None) == calls
        assert message["content"] == content


@pytest.mark.parametrize("extra,spec", [
    ({"guided_choice": ["yes", "no"]}, GuidedSpec.choice(["yes", "no"])),
    ({"guided_regex": "y[a-z]s"}, GuidedSpec.regex("y[a-z]s")),
    ({"guided_grammar": 'root ::= "yes"'}, GuidedSpec.grammar('root ::= "yes"')),
    ({"guided_json": SCHEMA}, GuidedSpec.json_schema(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, GuidedSpec.json_schema(SCHEMA)),  # a schema sent as JSON text
    ({"structured_outputs": {"choice": ["yes", "no"]}}, GuidedSpec.choice(["yes", "no"])),
    ({"structured_outputs": {"regex": "y[a-z]s"}}, GuidedSpec.regex("y[a-z]s")),
    ({"structured_outputs": {"json": SCHEMA}}, GuidedSpec.json_schema(SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, GuidedSpec.json_object()),
    ({"structured_outputs": {"grammar": 'root ::= "yes"'}}, GuidedSpec.grammar('root ::= "yes"')),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else "")
def test_vllm_structured_outputs_become_the_engine_grammar(extra, spec):
    """vLLM's guided_* fields and structured_outputs object; on chat the reply may open with GLM-4's "\\n"."""
    engine, r = post("/v1/completions", {"prompt": "Is it?", **extra}, ["yes"])
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.guided == spec
    engine, r = post("/v1/chat/completions", {"messages": HI, **extra}, ["\nyes"])
    assert r.status_code == 200, r.text
    assert engine.calls[0].params.guided == GuidedSpec(**{**spec.__dict__, "leading_newline": True})
    if spec.kind in ("choice", "regex", "grammar"):
        assert r.json()["choices"][0]["message"]["content"] == "yes"


@pytest.mark.parametrize("extra,param", [
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),  # the message names both
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[1]"}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs.json"),
    ({"guided_regex": "(ab"}, "guided_regex"),  # the grammar engine's refusal, as a 400
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
])
def test_bad_vllm_structured_outputs_are_400(extra, param):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": HI})):
        _, r = post(path, {**body, **extra})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param, (path, r.json())
    if "guided_regex" in extra and "guided_choice" in extra:
        assert "guided_regex and guided_choice" in r.json()["error"]["message"]


def test_a_forced_tool_call_takes_no_vllm_constraint_beside_it():
    _, r = post("/v1/chat/completions", {"messages": HI, "tools": TOOLS, "tool_choice": "required",
                                         "guided_choice": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_choice"


def test_response_format_text_leaves_a_vllm_constraint_in_force():
    engine, r = post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "text"},
                                              "guided_regex": "y[a-z]s"}, ["\nyes"])
    assert r.status_code == 200 and engine.calls[0].params.guided == GuidedSpec.regex("y[a-z]s", leading_newline=True)
    _, r = post("/v1/completions", {"prompt": "x", "response_format": {"type": "text"}, "guided_regex": "("})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": {"type": "text"}, "tools": TOOLS,
                                         "tool_choice": "required", "guided_choice": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_choice"


@pytest.mark.parametrize("keyword,schema", [
    ("not", {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}}),
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
    ("contains", {"type": "array", "contains": {"const": 1}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("allOf of several", {"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 5}]}}}),
    ("multipleOf on numbers", {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0.5}}}),
    ("lookaround in a pattern", {"type": "object",
                                 "properties": {"v": {"type": "string", "pattern": "^(?!a)[a-c]{2}$"}}}),
    ("lookaround in a pattern", {"type": "object", "patternProperties": {"^x(?<=x)": {"type": "integer"}}}),
    ("maxLength beside a pattern", {"type": "object",
                                    "properties": {"s": {"type": "string", "maxLength": 2, "pattern": "^[a-z]+$"}}}),
    ("minLength beside a pattern", {"type": "object", "properties": {"s": {"type": "string", "minLength": 5,
                                                                         "pattern": "^a+$", "format": "email"}}}),
])
def test_schema_keywords_the_grammar_cannot_enforce_are_400(keyword, schema):
    for extra, param in (({"guided_json": schema}, "guided_json"),
                         ({"response_format": json_schema_format(schema)}, "response_format.json_schema.schema")):
        _, r = post("/v1/chat/completions", {"messages": HI, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert keyword in r.json()["error"]["message"]


def test_enforceable_schemas_and_property_names_like_keywords_are_served():
    # a property named "not", an enum holding "if", uniqueItems (pydantic's sets), allOf of one $ref
    # (pydantic's) and multipleOf on integers are fine
    schema = {"type": "object", "$defs": {"X": {"type": "integer"}},
              "properties": {"not": {"enum": ["if", "then"]},
                             "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                             "x": {"allOf": [{"$ref": "#/$defs/X"}]}, "even": {"type": "integer", "multipleOf": 2},
                             "code": {"type": "string", "pattern": "^(?:[A-Z]{2})\\(?=$"}}}  # a group; an escaped (
    _, r = post("/v1/chat/completions", {"messages": HI, "guided_json": schema})
    assert r.status_code == 200, r.text


def test_unsupported_structured_outputs_field_is_refused_not_ignored():
    _, r = post("/v1/completions", {"prompt": "x", "structured_outputs": {"structural_tag": "{}"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.structural_tag"


def test_a_reply_its_constraint_strands_is_a_400_whole_and_an_error_event_streamed():
    """Only a control character (never written) may follow "a": the request's fault, not a 500."""
    body = {"prompt": "x", "guided_choice": ["a\u0001b"], "max_tokens": 5}
    _, r = post("/v1/completions", body, ["a"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "allows no token here" in r.json()["error"]["message"]
    _, r = post("/v1/completions", {**body, "stream": True}, ["a"])
    errors = [c["error"] for c in sse_json(r.text) if "error" in c]
    assert [e["type"] for e in errors] == ["invalid_request_error"]


def test_a_string_with_a_format_and_a_pattern_or_lengths_is_held_to_those():
    """As zod writes z.uuid(): xgrammar alone would hold it to its built-in uuid format, which allows "D000"; as
    pydantic writes HttpUrl, it would pass over the lengths."""
    from xgrammar.testing import _is_grammar_accept_string

    from glm4serve.engine.guided import build_grammar

    uuid = "^[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
    schema = {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string", "format": "uuid", "pattern": uuid},
        "format": {"type": "string"}, "pattern": {"type": "string", "format": "date"}}}  # properties so named
    grammar = build_grammar(GuidedSpec.json_schema(schema))
    ok = '{"id": "00000000-0000-1000-8000-000000000000", "format": "x", "pattern": "2024-01-02"}'
    assert _is_grammar_accept_string(grammar, ok)
    assert not _is_grammar_accept_string(grammar, ok.replace("-1000-", "-D000-"))
    assert not _is_grammar_accept_string(grammar, ok.replace("2024-01-02", "soon"))  # a format alone still holds
    engine, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(schema)}, [ok])
    assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"])["id"].endswith("0000")
    url = {"type": "object", "required": ["u"], "properties": {
        "u": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 12}}}
    grammar = build_grammar(GuidedSpec.json_schema(url))
    assert _is_grammar_accept_string(grammar, '{"u": "http://a.b"}')
    assert not _is_grammar_accept_string(grammar, '{"u": "http://a.example"}') and not _is_grammar_accept_string(
        grammar, '{"u": ""}')
    _, r = post("/v1/chat/completions", {"messages": HI, "response_format": json_schema_format(url)},
                ['{"u": "http://a.b"}'])
    assert r.status_code == 200, r.text
