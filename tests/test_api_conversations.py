"""/v1/conversations: its routes, responses that continue and extend a conversation, and the store's budget."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from glm4serve.api.conversations import ConversationStore
from glm4serve.api.errors import APIError
from tests.api_fakes import MODEL, engine_of, make_app, shutdown_engines, small_tokenizer, wait_idle  # noqa: F401
from tests.test_api_responses import CALL, TOOL, events_of


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_create_get_update_and_delete():
    client = TestClient(make_app())
    made = ok(client.post("/v1/conversations", json={"metadata": {"topic": "sea"}}))
    assert made["object"] == "conversation" and made["id"].startswith("conv_")
    assert made["metadata"] == {"topic": "sea"} and isinstance(made["created_at"], int)
    assert ok(client.get(f"/v1/conversations/{made['id']}")) == made
    updated = ok(client.post(f"/v1/conversations/{made['id']}", json={"metadata": {"topic": "land"}}))
    assert updated == {**made, "metadata": {"topic": "land"}}
    assert ok(client.post(f"/v1/conversations/{made['id']}", json={"metadata": None}))["metadata"] == {}
    empty = ok(client.post("/v1/conversations"))  # no body at all, as `conversations.create()` may send
    assert empty["metadata"] == {} and empty["id"] != made["id"]
    assert ok(client.delete(f"/v1/conversations/{made['id']}")) == {
        "id": made["id"], "object": "conversation.deleted", "deleted": True}
    for method, path in (("GET", ""), ("POST", ""), ("DELETE", ""), ("GET", "/items"), ("POST", "/items"),
                         ("GET", "/items/msg_1"), ("DELETE", "/items/msg_1")):
        body = {"metadata": {}, "items": [{"role": "user", "content": "x"}]} if method == "POST" else None
        e = error(client.request(method, f"/v1/conversations/{made['id']}{path}", json=body), 404)
        assert made["id"] in e["message"] and e["code"] == "not_found"


def test_items_are_added_listed_in_pages_fetched_and_deleted():
    client = TestClient(make_app())
    conv = ok(client.post("/v1/conversations", json={"items": [
        {"role": "user", "content": "first"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "second"}]}]}))
    base = f"/v1/conversations/{conv['id']}/items"
    added = ok(client.post(base, json={"items": [
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "id": "fc_mine"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}))
    assert added["object"] == "list" and added["has_more"] is False
    assert [i["type"] for i in added["data"]] == ["function_call", "function_call_output"]
    assert (added["first_id"], added["last_id"]) == ("fc_mine", added["data"][1]["id"])
    listed = ok(client.get(base, params={"order": "asc", "limit": 100}))["data"]
    assert [i["type"] for i in listed] == ["message", "message", "function_call", "function_call_output"]
    assert listed[0]["content"] == [{"type": "input_text", "text": "first"}]
    assert listed[1]["content"] == [{"type": "output_text", "text": "second", "annotations": []}]
    assert all(i["status"] == "completed" and i["id"] for i in listed)
    newest_first = ok(client.get(base))  # desc by default, as OpenAI's
    assert newest_first["data"] == listed[::-1] and newest_first["has_more"] is False
    page = ok(client.get(base, params={"order": "asc", "limit": 2, "after": listed[0]["id"]}))
    assert page["data"] == listed[1:3] and page["has_more"] is True and page["last_id"] == listed[2]["id"]
    assert ok(client.get(f"{base}/fc_mine")) == listed[2]
    assert ok(client.delete(f"{base}/fc_mine")) == ok(client.get(f"/v1/conversations/{conv['id']}"))
    assert [i["id"] for i in ok(client.get(base, params={"order": "asc"}))["data"]] == [
        listed[0]["id"], listed[1]["id"], listed[3]["id"]]
    e = error(client.get(f"{base}/fc_mine"), 404)
    assert "fc_mine" in e["message"]
    assert error(client.get(base, params={"after": "nope"}))["param"] == "after"


@pytest.mark.parametrize("body, param, says", [
    ({"items": [{"role": "user", "content": str(i)} for i in range(21)]}, "items", "at most 20"),
    ({"items": [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_1"}]}, "items.1",
     "Item with id 'msg_1' not found"),
    ({"items": [{"role": "user", "content": "x"}, {"type": "banana", "id": "b_1"}]}, "items.1",
     "input items of type 'banana' are not supported"),
    ({"items": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}, "items.0",
     "a user message's parts are input_text; output_text is an assistant's"),
    ({"items": [{"role": "user", "content": "x", "id": "msg_a"}, {"role": "user", "content": "y", "id": "msg_a"}]},
     "items", "Duplicate item found with id 'msg_a'"),
    ({"items": [{"role": "user", "content": [{"type": "input_video"}]}]}, "items.0.content.0.type", "input_text"),
    ({"items": [{"role": "robot", "content": "x"}]}, "items.0.role", "'user'"),
    ({"items": "hello"}, "items", "list"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "16"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k", "512"),
    ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65, "64"),
])
def test_bad_conversations_are_400s_naming_the_field(body, param, says):
    e = error(TestClient(make_app()).post("/v1/conversations", json=body))
    assert e["param"] == param and says in e["message"], e


def test_adding_items_needs_one_to_twenty_new_ones():
    client = TestClient(make_app())
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "x", "id": "msg_a"}]}))
    e = error(client.post(f"/v1/conversations/{conv['id']}/items", json={"items": [
        {"role": "user", "content": "y", "id": "msg_a"}]}))
    assert e["param"] == "items" and "Duplicate item found with id 'msg_a'" in e["message"]
    e = error(client.post(f"/v1/conversations/{conv['id']}/items", json={"items": [
        {"type": "reasoning", "id": "rs_1", "summary": []}]}))  # dropped, as on the responses route: none is left
    assert e["param"] == "items" and "No item to add" in e["message"]
    assert len(ok(client.get(f"/v1/conversations/{conv['id']}/items"))["data"]) == 1
    assert error(client.post(f"/v1/conversations/{conv['id']}/items", json={"items": []}))["param"] == "items"
    assert error(client.post(f"/v1/conversations/{conv['id']}/items", json={}))["param"] == "items"
    assert error(client.post(f"/v1/conversations/{conv['id']}", json={}))["param"] == "metadata"


def test_a_response_continues_the_conversation_and_extends_it():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]}))
    base = f"/v1/conversations/{conv['id']}/items"
    first = ok(client.post("/v1/responses", json={"model": MODEL, "conversation": conv["id"]}))  # input left out
    assert first["conversation"] == {"id": conv["id"]} and first["status"] == "completed"
    second = ok(client.post("/v1/responses", json={"input": "and you?", "conversation": {"id": conv["id"]},
                                                   "instructions": "be brief", "store": False}))
    assert second["conversation"] == {"id": conv["id"]} and second["store"] is False
    prompts = [small_tokenizer().decode(c.prompt_ids) for c in engine_of(app).calls]
    assert prompts[0] == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert prompts[1] == ("[gMASK]<sop><|system|>\nbe brief<|user|>\nhi<|assistant|>\nHello<|user|>\nand you?"
                          "<|assistant|>")
    items = ok(client.get(base, params={"order": "asc"}))["data"]
    assert [(i["type"], i["role"]) for i in items] == [("message", "user"), ("message", "assistant"),
                                                         ("message", "user"), ("message", "assistant")]
    assert items[1] == first["output"][0] and items[3] == second["output"][0]
    assert items[2]["content"] == [{"type": "input_text", "text": "and you?"}]
    assert ok(client.get(f"/v1/responses/{first['id']}/input_items", params={"order": "asc"}))["data"] == items[:1]
    without = ok(client.post("/v1/responses", json={"input": "x"}))
    assert without["conversation"] is None


def test_a_streamed_response_extends_the_conversation_before_its_last_event():
    client = TestClient(make_app(replies=[CALL]))
    conv = ok(client.post("/v1/conversations"))
    r = client.post("/v1/responses", json={"input": "weather in Paris?", "tools": [TOOL], "stream": True,
                                          "conversation": conv["id"]})
    events = events_of(r.text)
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and final["conversation"] == {"id": conv["id"]}
    assert events[0]["response"]["conversation"] == {"id": conv["id"]}
    items = ok(client.get(f"/v1/conversations/{conv['id']}/items", params={"order": "asc"}))["data"]
    assert [i["type"] for i in items] == ["message", "function_call"] and items[1] == final["output"][0]


def test_a_failed_response_adds_nothing():
    app = make_app(replies=["\nHello there, a long reply!"], fail_after_steps=4)
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]}))
    r = client.post("/v1/responses", json={"input": "more", "stream": True, "conversation": conv["id"]})
    assert events_of(r.text)[-1]["type"] == "response.failed"
    wait_idle(engine_of(app))
    assert len(ok(client.get(f"/v1/conversations/{conv['id']}/items"))["data"]) == 1


def test_a_conversation_deleted_meanwhile_is_not_brought_back():
    app = make_app(replies=["\nHello"], step_delay=0.05)
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations"))
    ctx = app.state.serving
    stream = client.stream("POST", "/v1/responses", json={"input": "hi", "stream": True,
                                                         "conversation": conv["id"]})
    with stream as r:
        lines = r.iter_lines()
        next(lines)  # the response has begun
        ctx.conversations.delete(conv["id"])
        rest = "\n".join(lines)
    assert "response.completed" in rest and len(ctx.conversations) == 0
    assert error(client.get(f"/v1/conversations/{conv['id']}"), 404)


@pytest.mark.parametrize("body, status, param, says", [
    ({"input": "x", "conversation": "conv_nope"}, 404, "conversation", "'conv_nope' not found"),
    ({"input": "x", "conversation": {"id": "conv_nope"}}, 404, "conversation", "'conv_nope' not found"),
    ({"input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"}, 400, "conversation", "both"),
    ({"conversation": {"name": "x"}}, 400, "conversation.id", "required"),
    ({}, 400, "input", "must not be empty"),
    ({"input": "x", "metadata": {"k": ["v"]}}, 400, "metadata.k", "string"),
])
def test_bad_conversation_parameters(body, status, param, says):
    e = error(TestClient(make_app()).post("/v1/responses", json=body), status)
    assert e["param"] == param and says in e["message"], e


def test_count_input_tokens_reads_the_conversation():
    app = make_app()
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "a long question"}]}))
    alone = ok(client.post("/v1/responses/input_tokens", json={"input": "x"}))["input_tokens"]
    within = ok(client.post("/v1/responses/input_tokens", json={"input": "x", "conversation": conv["id"]}))
    assert within["input_tokens"] > alone


def test_a_server_that_keeps_none():
    client = TestClient(make_app(conversation_store_memory=0))
    e = error(client.post("/v1/conversations"))
    assert "--conversation-store-memory 0" in e["message"]


def _items(i: int, n: int = 1) -> list[dict]:
    return [{"id": f"msg_{i}_{k}", "type": "message", "role": "user", "content": [{"type": "input_text",
                                                                                   "text": "x" * 100}]}
            for k in range(n)]


def test_the_store_drops_the_least_recently_used_past_its_budget():
    one = len('{"id":"msg_0_0","type":"message","role":"user","content":[{"type":"input_text","text":""}]}') + 100
    store = ConversationStore(budget_bytes=3 * (one + 2))  # +2: each one's empty metadata, "{}"
    a, b, c = (store.create({}, _items(i)) for i in range(3))
    assert store.used == 3 * (one + 2) and len(store) == 3
    store.get(a.id)  # b is now the least recently used
    d = store.create({}, _items(3))
    assert store.get(b.id) is None and store.kept(a) and store.kept(c) and store.kept(d)
    store.add(a, _items(4))  # room for it: c, the least recently used but for a itself, goes
    assert store.get(c.id) is None and store.kept(a) and store.kept(d) and len(a.items) == 2
    with pytest.raises(APIError, match="over the server's --conversation-store-memory"):
        store.add(a, _items(5, 3))  # a alone would be over the budget: nothing changes
    assert len(a.items) == 2 and store.kept(d)
    store.delete_item(a, "msg_4_0")
    assert store.used == a.size + d.size == 2 * (one + 2)
    with pytest.raises(APIError, match="over the server's"):
        store.create({}, _items(6, 4))
    assert len(store) == 2 and store.used == 2 * (one + 2)
    store.delete_item(a, "msg_0_0")
    assert a.size == 2 and store.used == 2 + one + 2  # what it holds, to the byte: its metadata


def test_a_response_repeating_an_items_id_is_refused():
    app = make_app(replies=["\nHello"])
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]}))
    first = ok(client.post("/v1/responses", json={"conversation": conv["id"]}))
    again = {"conversation": conv["id"], "input": [first["output"][0], {"role": "user", "content": "and?"}]}
    e = error(client.post("/v1/responses", json=again))
    assert e["param"] == "input" and first["output"][0]["id"] in e["message"]
    twice = [{"role": "user", "content": "a", "id": "msg_x"}, {"role": "user", "content": "b", "id": "msg_x"}]
    assert error(client.post("/v1/responses", json={"input": twice}))["param"] == "input"
    assert len(engine_of(app).calls) == 1
    assert len(ok(client.get(f"/v1/conversations/{conv['id']}/items"))["data"]) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_its_conversation_cannot_hold_fails_and_is_not_stored(stream):
    app = make_app(replies=["\n" + "Hello " * 300], conversation_store_memory=1500)
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]}))
    r = client.post("/v1/responses", json={"conversation": conv["id"], "stream": stream})
    if stream:
        events = events_of(r.text)
        assert events[-1]["type"] == "response.failed" and "--conversation-store-memory" in events[-2]["message"]
        response_id = events[0]["response"]["id"]
    else:
        assert "--conversation-store-memory" in error(r)["message"]
        response_id = None
    assert len(ok(client.get(f"/v1/conversations/{conv['id']}/items"))["data"]) == 1
    assert response_id is None or client.get(f"/v1/responses/{response_id}").status_code == 404
    calls = len(engine_of(app).calls)
    e = error(client.post("/v1/responses", json={"conversation": conv["id"], "input": "x" * 2000}))
    assert e["param"] == "input" and len(engine_of(app).calls) == calls  # refused before it ran


def test_an_id_added_while_a_response_ran_fails_the_response_not_the_conversation():
    app = make_app(replies=["\nHello there, a long reply!"], step_delay=0.05)
    client = TestClient(app)
    conv = ok(client.post("/v1/conversations"))
    body = {"stream": True, "conversation": conv["id"], "input": [{"role": "user", "content": "a", "id": "msg_d"}]}
    with client.stream("POST", "/v1/responses", json=body) as r:
        lines = r.iter_lines()
        next(lines)  # the response has begun
        ok(client.post(f"/v1/conversations/{conv['id']}/items", json={"items": [
            {"role": "user", "content": "b", "id": "msg_d"}]}))
        rest = "\n".join(lines)
    assert "response.failed" in rest and "Duplicate item found with id 'msg_d'" in rest
    assert [i["id"] for i in ok(client.get(f"/v1/conversations/{conv['id']}/items"))["data"]] == ["msg_d"]


def test_a_refused_conversation_drops_no_other():
    store = ConversationStore(budget_bytes=1000)
    kept = store.create({}, [{"id": "msg_1", "type": "message", "text": "x" * 800}])
    with pytest.raises(APIError, match="over the server's"):
        store.create({"k": "v" * 200}, [{"id": "msg_2", "type": "message", "text": "y" * 2000}])
    assert store.kept(kept) and len(store) == 1 and store.used == kept.size


def test_an_item_reference_adds_the_stored_item_it_names():
    client = TestClient(make_app(replies=["\nHello there!"]))
    made = ok(client.post("/v1/responses", json={"input": "hi"}))
    [message] = made["output"]
    conv = ok(client.post("/v1/conversations", json={"items": [{"type": "item_reference", "id": message["id"]}]}))
    base = f"/v1/conversations/{conv['id']}/items"
    [kept] = ok(client.get(base))["data"]
    assert kept["id"] == message["id"] and kept["content"][0]["text"] == "Hello there!"
    # the input item too, by its id; the same item twice is a duplicate, as any
    input_id = ok(client.get(f"/v1/responses/{made['id']}/input_items"))["data"][0]["id"]
    ok(client.post(base, json={"items": [{"type": "item_reference", "id": input_id}]}))
    e = error(client.post(base, json={"items": [{"type": "item_reference", "id": message["id"]}]}))
    assert "Duplicate item" in e["message"]
