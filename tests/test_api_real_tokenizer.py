"""The API with glm-4-9b-chat's real tokenizer and chat template (no weights: the real engine over a
scripted model runner)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import engine_of, make_app, shutdown_engines  # noqa: F401 - shutdown_engines is autouse

from shared_models import GLM4_CHAT_DIR as CHAT_DIR


@pytest.fixture(scope="module")
def tokenizer():
    if not (CHAT_DIR / "tokenizer.model").is_file():
        pytest.skip(f"{CHAT_DIR} is absent")
    from glm4serve.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(CHAT_DIR)


def test_prompt_ids_match_the_published_check_value(tokenizer):
    app = make_app(replies=["\n你好！"], tokenizer=tokenizer)
    client = TestClient(app)
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert engine_of(app).calls[0].prompt_ids == [151331, 151333, 151336, 198, 6023, 151337]
    assert body["choices"][0]["message"]["content"] == "你好！"
    assert client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"] == [
        151331, 151333, 151336, 198, 6023, 151337]


def test_chinese_streams_whole_characters(tokenizer):
    reply = "\n今天天气很好，我们一起去公园散步吧。"
    r = TestClient(make_app(replies=[reply], tokenizer=tokenizer)).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "")
              for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert "".join(deltas) == reply[1:]
    assert all("\ufffd" not in d for d in deltas)


def test_tools_render_the_official_tool_turn_and_parse_the_call(tokenizer):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "天气", "parameters": parameters}}
    app = make_app(replies=['get_weather\n{"city": "北京"}'], tokenizer=tokenizer)
    body = TestClient(app).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "北京天气？"}], "tools": [tool]}).json()
    prompt = tokenizer.decode(engine_of(app).calls[0].prompt_ids)
    assert prompt.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手")
    assert "## get_weather\n\n" in prompt
    assert "在调用上述函数时，请使用 Json 格式表示调用的参数。" in prompt
    assert prompt.endswith("<|user|>\n北京天气？<|assistant|>")
    [tc] = body["choices"][0]["message"]["tool_calls"]
    assert tc["function"]["name"] == "get_weather" and json.loads(tc["function"]["arguments"]) == {"city": "北京"}
