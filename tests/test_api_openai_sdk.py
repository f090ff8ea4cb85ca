"""The wire format against the official OpenAI SDK (strict response validation), over real
uvicorn on a free localhost port, with the real engine over a scripted model runner behind it."""

from __future__ import annotations

import json

import openai
import pytest

from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    engine_of,
    make_app,
    served,
    shutdown_engines,
    small_tokenizer,
)

API_KEY = "test-key"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def scripted_reply(call) -> list[str]:
    prompt = small_tokenizer().decode(call.prompt_ids)
    if "## get_weather" in prompt:
        return ['get_weather\n{"city": "Paris"}']
    if prompt.endswith("<|assistant|>"):
        return ["\nHello there!"]
    return [" the sea is wide"]


@pytest.fixture(scope="module")
def base_url():
    app = make_app(replies=scripted_reply, api_key=API_KEY)
    with served(app) as url:
        yield url + "/v1"


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10,
                         _strict_response_validation=True)


def test_chat_whole(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello there!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True}, n=2)
    chunks = list(stream)
    text = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
    assert text == {0: "Hello there!", 1: "Hello there!"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions(client, base_url):
    r = client.completions.create(model=MODEL, prompt="Write:", max_tokens=30, logprobs=1)
    assert r.choices[0].text == " the sea is wide" and r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    # Streamed completion chunks carry finish_reason null until the end, as OpenAI's own API
    # does; the SDK's Completion type declares it non-null, so strict validation cannot apply.
    lenient = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10)
    chunks = list(lenient.completions.create(model=MODEL, prompt="Write:", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " the sea is wide"
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]


def test_tool_call_through_the_stream_helper(client):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                                        tools=[WEATHER_TOOL]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [tc] = choice.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert tc.id.startswith("call_")
    assert "tool_calls.function.arguments.delta" in events and "tool_calls.function.arguments.done" in events


def test_errors_map_to_sdk_exceptions(client, base_url):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[], temperature=3)
    assert bad.value.status_code == 400 and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    wrong_key = openai.OpenAI(base_url=base_url, api_key="nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert [m.id for m in client.models.list()] == [MODEL]


def test_conversations_through_the_sdk(client):
    conv = client.conversations.create(items=[{"role": "user", "content": "hi"}], metadata={"topic": "sea"})
    assert conv.metadata == {"topic": "sea"}
    added = client.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": "Hello there!"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and you?"}]}])
    assert [item.role for item in added.data] == ["assistant", "user"] and added.first_id == added.data[0].id
    response = client.responses.create(model=MODEL, conversation=conv.id)
    assert response.conversation.id == conv.id and response.output_text == "Hello there!"
    with client.responses.stream(model=MODEL, input="more", conversation={"id": conv.id}) as stream:
        streamed = stream.get_final_response()
    items = list(client.conversations.items.list(conv.id, order="asc", limit=2))  # the SDK pages by `after`
    assert [item.type for item in items] == ["message"] * 6
    assert [item.content[0].text for item in items] == ["hi", "Hello there!", "and you?", "Hello there!", "more",
                                                        "Hello there!"]
    assert items[5].id == streamed.output[0].id
    assert client.conversations.items.retrieve(items[1].id, conversation_id=conv.id).id == items[1].id
    assert client.conversations.items.delete(items[1].id, conversation_id=conv.id).id == conv.id
    assert client.conversations.update(conv.id, metadata={"topic": "land"}).metadata == {"topic": "land"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "land"}
    assert client.conversations.delete(conv.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
