"""/v1/completions against the scripted FakeEngine."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api_fakes import MODEL, FakeEngine, make_app, small_tokenizer, sse_json

REPLY = " the sea is wide"


def post(engine, **body):
    r = TestClient(make_app(engine)).post("/v1/completions", json=body)
    return r


def test_text_prompt_gets_glm_prefix_tokens_and_default_max_tokens():
    tok = small_tokenizer()
    engine = FakeEngine(tok, replies=[REPLY])
    body = post(engine, model=MODEL, prompt="Write:").json()
    [call] = engine.calls
    prefix = [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]
    assert call.prompt_ids == prefix + tok.encode("Write:")
    assert call.params.max_tokens == 16  # OpenAI's completions default
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}
    n_out = len(tok.encode(REPLY)) + 1
    assert body["usage"] == {"prompt_tokens": len(call.prompt_ids), "completion_tokens": n_out,
                             "total_tokens": len(call.prompt_ids) + n_out}


def test_add_special_tokens_false_and_prompts_already_prefixed_are_left_alone():
    tok = small_tokenizer()
    engine = FakeEngine(tok, replies=[REPLY])
    post(engine, prompt="Write:", add_special_tokens=False)
    post(engine, prompt="[gMASK]<sop>Write:")
    assert engine.calls[0].prompt_ids == tok.encode("Write:")
    assert engine.calls[1].prompt_ids == tok.encode("[gMASK]<sop>Write:")


def test_several_prompts_and_n_index_choices_prompt_major():
    engine = FakeEngine(small_tokenizer(), replies=[" a", " bb"])
    body = post(engine, prompt=["one", "two"], n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [" a", " bb", " a", " bb"]
    assert len(engine.calls) == 2 and len({c.request_id for c in engine.calls}) == 2
    assert body["usage"]["prompt_tokens"] == sum(len(c.prompt_ids) for c in engine.calls)


def test_token_id_prompts_are_passed_through():
    engine = FakeEngine(small_tokenizer(), replies=[REPLY])
    post(engine, prompt=[5, 6, 7])
    post(engine, prompt=[[8, 9], [10]])
    assert [c.prompt_ids for c in engine.calls] == [[5, 6, 7], [8, 9], [10]]


def test_echo_prepends_the_prompt():
    engine = FakeEngine(small_tokenizer(), replies=[REPLY])
    body = post(engine, prompt="Write:", echo=True).json()
    assert body["choices"][0]["text"] == "Write:" + REPLY


def test_logprobs_arrays_line_up():
    tok = small_tokenizer()
    engine = FakeEngine(tok, replies=[REPLY])
    lp = post(engine, prompt="Write:", logprobs=2, max_tokens=4).json()["choices"][0]["logprobs"]
    assert engine.calls[0].params.logprobs == 2
    assert lp["tokens"] == [tok.decode([t]) for t in tok.encode(REPLY)[:4]]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 3


def test_stream_chunks_and_usage():
    engine = FakeEngine(small_tokenizer(), replies=[REPLY, " x"])
    r = post(engine, prompt="Write:", stream=True, n=2, stream_options={"include_usage": True})
    chunks = sse_json(r.text)
    *body, last = chunks
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == sum(len(small_tokenizer().encode(r)) + 1 for r in (REPLY, " x"))
    for i, expected in enumerate([REPLY, " x"]):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert "".join(ch["text"] for ch in mine) == expected
        assert [ch["finish_reason"] for ch in mine] == [None] * (len(mine) - 1) + ["stop"]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in body)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_stream_echo_comes_first():
    engine = FakeEngine(small_tokenizer(), replies=[REPLY])
    chunks = sse_json(post(engine, prompt="Write:", stream=True, echo=True).text)
    assert chunks[0]["choices"][0]["text"] == "Write:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Write:" + REPLY


def test_max_tokens_null_means_rest_of_context():
    engine = FakeEngine(small_tokenizer(), replies=[REPLY])
    client = TestClient(make_app(engine, max_model_len=64))
    client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": None})
    assert engine.calls[0].params.max_tokens == 61
