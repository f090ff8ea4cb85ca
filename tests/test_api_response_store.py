"""Stored responses: previous_response_id continues a stored context, GET/DELETE
/v1/responses/{id}, its input items, `store: false`, and the store's budget."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from glm4serve.api.response_store import ResponseStore
from glm4serve.api.settings import ServerSettings
from tests.api_fakes import MODEL, engine_of, make_app, shutdown_engines, small_tokenizer  # noqa: F401
from tests.test_api_responses import CALL, CHAT_TOOL, TOOL, events_of


def create(client: TestClient, **body) -> dict:
    r = client.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_follow_up_continues_the_context_without_the_earlier_instructions():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    first = create(client, input="hi", instructions="be brief")
    assert first["store"] is True and first["previous_response_id"] is None
    second = create(client, input="and you?", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"] and second["status"] == "completed"
    third = create(client, input=[{"role": "user", "content": "last"}], previous_response_id=second["id"],
                   instructions="rules")
    assert third["output"][0]["content"][0]["text"] == "Hello"
    messages = [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "and you?"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "last"}]
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).status_code == 200
    calls = engine_of(app).calls
    assert small_tokenizer().decode(calls[1].prompt_ids) == (
        "[gMASK]<sop><|user|>\nhi<|assistant|>\nHello<|user|>\nand you?<|assistant|>")
    assert calls[2].prompt_ids == calls[3].prompt_ids


def test_a_function_call_output_follows_the_stored_call():
    app = make_app(replies=[CALL])
    client = TestClient(app)
    first = create(client, input="weather in Paris?", tools=[TOOL])
    [call] = first["output"]
    assert call["type"] == "function_call"
    create(client, previous_response_id=first["id"], tools=[TOOL],
           input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}])
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call["call_id"], "type": "function",
                     "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                {"role": "tool", "tool_call_id": call["call_id"], "content": "sunny"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [CHAT_TOOL]})
    assert r.status_code == 200
    calls = engine_of(app).calls
    assert calls[1].prompt_ids == calls[2].prompt_ids


def test_a_streamed_reply_is_stored_before_its_last_event():
    client = TestClient(make_app(replies=["\nHello there!"]))
    events = events_of(client.post("/v1/responses", json={"input": "hi", "stream": True}).text)
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["store"] is True
    assert client.get(f"/v1/responses/{final['id']}").json() == final
    follow_up = create(client, input="more", previous_response_id=final["id"])
    assert follow_up["status"] == "completed"


def test_get_delete_and_cancel():
    client = TestClient(make_app())
    made = create(client, input="hi")
    assert client.get(f"/v1/responses/{made['id']}").json() == made
    r = client.get(f"/v1/responses/{made['id']}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = client.post(f"/v1/responses/{made['id']}/cancel")
    assert r.status_code == 400 and "background" in r.json()["error"]["message"]
    assert client.delete(f"/v1/responses/{made['id']}").json() == {"id": made["id"], "object": "response",
                                                                    "deleted": True}
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
        r = client.request(method, f"/v1/responses/{made['id']}{path}")
        assert r.status_code == 404 and "not found" in r.json()["error"]["message"], (method, path)
    r = client.post("/v1/responses", json={"input": "x", "previous_response_id": made["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"


def test_compaction_is_a_404_saying_so():
    r = TestClient(make_app()).post("/v1/responses/compact", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 404 and "compact is not served" in r.json()["error"]["message"]


def test_input_items_list_the_whole_context_in_pages():
    client = TestClient(make_app(replies=["\nHello"]))
    first = create(client, input=[{"role": "user", "content": "hi", "id": "msg_mine"}])
    second = create(client, previous_response_id=first["id"],
                    input=[{"role": "user", "content": [{"type": "input_text", "text": "more"}]},
                           {"type": "reasoning", "summary": []}])
    items = client.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()
    assert items["object"] == "list" and items["has_more"] is False
    kinds = [(i["type"], i["role"], i["content"][0]["type"], i["content"][0]["text"]) for i in items["data"]]
    assert kinds == [("message", "user", "input_text", "hi"), ("message", "assistant", "output_text", "Hello"),
                     ("message", "user", "input_text", "more")]
    assert items["data"][0]["id"] == "msg_mine" and items["data"][1] == first["output"][0]
    newest = client.get(f"/v1/responses/{second['id']}/input_items", params={"limit": 2}).json()
    assert newest["data"] == items["data"][::-1][:2] and newest["has_more"] is True
    assert newest["first_id"] == items["data"][2]["id"] and newest["last_id"] == items["data"][1]["id"]
    rest = client.get(f"/v1/responses/{second['id']}/input_items",
                      params={"limit": 2, "after": newest["last_id"]}).json()
    assert rest["data"] == [items["data"][0]] and rest["has_more"] is False
    for params in ({"after": "msg_nope"}, {"limit": 0}, {"limit": 101}, {"order": "up"}):
        r = client.get(f"/v1/responses/{second['id']}/input_items", params=params)
        assert r.status_code == 400, params


def test_store_false_and_a_server_that_stores_none():
    client = TestClient(make_app())
    made = create(client, input="hi", store=False)
    assert made["store"] is False and client.get(f"/v1/responses/{made['id']}").status_code == 404
    client = TestClient(make_app(response_store_memory=0))
    made = create(client, input="hi")
    assert made["store"] is False
    r = client.get(f"/v1/responses/{made['id']}")
    assert r.status_code == 404 and "stores no responses" in r.json()["error"]["message"]
    r = client.post("/v1/responses", json={"input": "x", "previous_response_id": made["id"]})
    assert r.status_code == 400 and "stores no responses" in r.json()["error"]["message"]


def _response(i: int, text: str = "x" * 100) -> dict:
    return {"id": f"resp_{i}", "output": [{"id": f"msg_{i}", "type": "message",
                                           "content": [{"type": "output_text", "text": text}]}]}


def test_the_store_drops_the_least_recently_used_past_its_budget():
    one = len(str(_response(0))) + 16  # a little over one response's JSON
    store = ResponseStore(int(2.5 * one))
    assert store.put(_response(0), []) and store.put(_response(1), [])
    assert store.get("resp_0") is not None  # now the most recently used
    assert store.put(_response(2), [])
    assert [store.get(f"resp_{i}") is not None for i in range(3)] == [True, False, True]
    assert not store.put(_response(3, "y" * 10 * one), [])  # over the whole budget: kept out, nothing dropped
    assert len(store) == 2 and 0 < store.used <= store.budget
    assert store.item("msg_0") is not None and store.item("msg_1") is None  # dropped with its response
    assert store.delete("resp_0") and not store.delete("resp_0") and len(store) == 1
    assert store.get("resp_2").context == _response(2)["output"] and store.item("msg_0") is None
    store.put({"id": "resp_4", "output": []}, _response(2)["output"])  # an item two responses hold
    assert store.delete("resp_2") and store.item("msg_2") == _response(2)["output"][0]
    assert store.delete("resp_4") and store.item("msg_2") is None


@pytest.mark.parametrize("value, expected", [("0", 0), (0, 0), ("1MiB", 1024**2), (4096, 4096)])
def test_the_budget_setting_reads_sizes_and_zero(value, expected):
    assert ServerSettings(response_store_memory=value).response_store_memory == expected


def test_an_item_reference_stands_for_a_stored_item():
    """The Vercel AI SDK's OpenAI provider sends its earlier replies back as item_reference items."""
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    first = create(client, input="hi")
    reply = first["output"][0]
    second = create(client, input=[{"role": "user", "content": "hi"}, {"type": "item_reference", "id": reply["id"]},
                                   {"role": "user", "content": "and you?"}])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "and you?"}]
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).status_code == 200
    calls = engine_of(app).calls
    assert calls[1].prompt_ids == calls[2].prompt_ids
    listed = client.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert (listed[1]["id"], listed[1]["role"], listed[1]["content"][0]["text"]) == (reply["id"], "assistant",
                                                                                     "Hello")
    e = client.post("/v1/responses", json={"input": [{"type": "item_reference", "id": "msg_nope"}]}).json()["error"]
    assert e["param"] == "input.0" and "'msg_nope' not found" in e["message"]
    none_kept = TestClient(make_app(response_store_memory=0)).post(
        "/v1/responses", json={"input": [{"type": "item_reference", "id": reply["id"]}]})
    assert none_kept.status_code == 400 and "stores no responses" in none_kept.json()["error"]["message"]


def test_a_reference_never_reaches_a_deleted_response():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    secret = create(client, input=[{"role": "user", "content": "SECRET", "id": "msg_x"}])
    create(client, input=[{"role": "user", "content": "other", "id": "msg_x"}])  # the same id, another item
    assert client.delete(f"/v1/responses/{secret['id']}").status_code == 200
    create(client, input=[{"type": "item_reference", "id": "msg_x"}])
    prompt = small_tokenizer().decode(engine_of(app).calls[-1].prompt_ids)
    assert "other" in prompt and "SECRET" not in prompt


def test_a_reference_to_an_item_of_the_context_continued_from_is_dropped():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    first = create(client, input="hi")
    create(client, previous_response_id=first["id"],
           input=[{"type": "item_reference", "id": first["output"][0]["id"]}, {"role": "user", "content": "more"}])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "more"}]
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).status_code == 200
    calls = engine_of(app).calls
    assert calls[1].prompt_ids == calls[2].prompt_ids
