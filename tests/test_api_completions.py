"""/v1/completions over the real engine and a scripted model runner."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    choice_indices_and_usage,
    engine_of,
    full_blocks,
    make_app,
    shutdown_engines,
    small_tokenizer,
    sse_json,
)

REPLY = " the sea is wide"


def post(client: TestClient, **body):
    return client.post("/v1/completions", json=body)


def client_for(*replies: str, **kw) -> TestClient:
    return TestClient(make_app(replies=list(replies or [REPLY]), **kw))


def test_text_prompt_gets_glm_prefix_tokens_and_default_max_tokens():
    tok = small_tokenizer()
    client = client_for()
    body = post(client, model=MODEL, prompt="Write:").json()
    [call] = engine_of(client.app).calls
    prefix = [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]
    assert call.prompt_ids == prefix + tok.encode("Write:")
    assert call.params.max_tokens == 16  # OpenAI's completions default
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    n_out = len(tok.encode(REPLY)) + 1
    assert body["usage"] == {"prompt_tokens": len(call.prompt_ids), "completion_tokens": n_out,
                             "total_tokens": len(call.prompt_ids) + n_out,
                             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}}


def test_add_special_tokens_false_and_prompts_already_prefixed_are_left_alone():
    tok = small_tokenizer()
    client = client_for()
    post(client, prompt="Write:", add_special_tokens=False)
    post(client, prompt="[gMASK]<sop>Write:")
    calls = engine_of(client.app).calls
    assert calls[0].prompt_ids == tok.encode("Write:")
    assert calls[1].prompt_ids == tok.encode("[gMASK]<sop>Write:")


def test_several_prompts_and_n_index_choices_prompt_major():
    # the n choices of a prompt sample their first token from the same logits: " a" for both
    client = client_for(" a", " a bb")
    body = post(client, prompt=["one", "two"], n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [" a", " a bb", " a", " a bb"]
    calls = engine_of(client.app).calls
    assert len(calls) == 2 and len({c.request_id for c in calls}) == 2
    assert body["usage"]["prompt_tokens"] == sum(len(c.prompt_ids) for c in calls)


def test_token_id_prompts_are_passed_through():
    client = client_for()
    post(client, prompt=[5, 6, 7])
    post(client, prompt=[[8, 9], [10]])
    assert [c.prompt_ids for c in engine_of(client.app).calls] == [[5, 6, 7], [8, 9], [10]]


@pytest.mark.parametrize("stream", [False, True])
def test_text_offsets_index_the_text_where_tokens_split_characters(stream):
    tok = small_tokenizer()
    reply = " 好的😀,诃字 ok"
    ids = tok.encode(reply)
    assert any("\ufffd" in tok.token_bytes(t).decode("utf-8", "replace") for t in ids)  # part of a character
    r = post(client_for(reply), prompt="Write:", logprobs=0, max_tokens=50, stream=stream)
    if stream:
        chunks = sse_json(r.text)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        offsets = [o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]]
    else:
        text = r.json()["choices"][0]["text"]
        offsets = r.json()["choices"][0]["logprobs"]["text_offset"]
    assert text == reply
    data = tok.encode(reply)  # the reply's tokens, then the stop token (no text)
    starts = [len(b"".join(tok.token_bytes(t) for t in data[:i])) for i in range(len(data))] + [len(reply.encode())]
    # the character holding each token's first byte: the whole characters before that byte
    assert offsets == [len(reply.encode()[:b].decode("utf-8", "ignore")) for b in starts]


def test_echo_prepends_the_prompt():
    body = post(client_for(), prompt="Write:", echo=True).json()
    assert body["choices"][0]["text"] == "Write:" + REPLY


def test_logprobs_arrays_line_up():
    tok = small_tokenizer()
    client = client_for()
    lp = post(client, prompt="Write:", logprobs=2, max_tokens=4).json()["choices"][0]["logprobs"]
    assert engine_of(client.app).calls[0].params.logprobs == 2
    assert lp["tokens"] == [tok.decode([t]) for t in tok.encode(REPLY)[:4]]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 3
        # the runner's logits: the token 40 over all others, which are equal
        assert logprob == pytest.approx(0, abs=1e-6) and top[token] == logprob
        assert sorted(v for t, v in top.items() if t != token) == pytest.approx([-40] * (len(top) - 1), abs=1e-3)


def test_stream_chunks_and_usage():
    # both choices start with " the": the first token comes from the same logits
    replies = [REPLY, " the end"]
    r = post(client_for(*replies), prompt="Write:", stream=True, n=2, stream_options={"include_usage": True})
    chunks = sse_json(r.text)
    *body, last = chunks
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == sum(len(small_tokenizer().encode(r)) + 1 for r in replies)
    for i, expected in enumerate(replies):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert "".join(ch["text"] for ch in mine) == expected
        assert [ch["finish_reason"] for ch in mine] == [None] * (len(mine) - 1) + ["stop"]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in body)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_stream_echo_comes_first():
    chunks = sse_json(post(client_for(), prompt="Write:", stream=True, echo=True).text)
    assert chunks[0]["choices"][0]["text"] == "Write:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Write:" + REPLY


def test_max_tokens_null_means_rest_of_context():
    client = client_for(max_model_len=64)
    client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": None})
    assert engine_of(client.app).calls[0].params.max_tokens == 61


# The scripted runner's rows for prompt logprobs are all 0: every token has logprob -log(vocabulary), rank 1.


def test_echo_with_logprobs_scores_every_prompt_token_as_evaluation_harnesses_read_it():
    """lm-evaluation-harness's log-likelihood request: token ids, echo, logprobs=1, max_tokens=1."""
    tok = small_tokenizer()
    client = client_for()
    prompt = tok.encode("The sea is wide")
    body = post(client, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0).json()
    assert engine_of(client.app).calls[0].params.prompt_logprobs == 1
    [choice] = body["choices"]
    lp = choice["logprobs"]
    first = tok.encode(REPLY)[0]
    assert choice["text"] == "The sea is wide" + tok.decode([first])
    assert lp["tokens"] == [tok.decode([t]) for t in prompt + [first]]
    uniform = -math.log(tok.vocab_size)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx([uniform] * (len(prompt) - 1))
    for token, top in zip(lp["tokens"][1 : len(prompt)], lp["top_logprobs"][1 : len(prompt)]):
        assert token in top and 1 <= len(top) <= 2 and top[token] == pytest.approx(uniform)
    assert lp["token_logprobs"][-1] == pytest.approx(0, abs=1e-6)  # the reply's token: the runner's 40 over 0
    # offsets index the choice's text, prompt included
    starts = [choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"])]
    assert starts == [True] * (len(prompt) + 1)
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_returns_the_scored_prompt_alone(stream):
    tok = small_tokenizer()
    client = client_for()
    body = {"prompt": "Write:", "echo": True, "logprobs": 0, "max_tokens": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = post(client, **body)
    assert engine_of(client.app).calls[0].params.max_tokens == 1  # the engine samples one token, left out
    prompt = tok.with_prefix(tok.encode("Write:"))
    if stream:
        *chunks, last = sse_json(r.text)
        choices = [c["choices"][0] for c in chunks]
        assert "".join(c["text"] for c in choices) == "Write:" and choices[-1]["finish_reason"] == "length"
        lp = choices[0]["logprobs"]
        usage = last["usage"]
    else:
        [choice] = r.json()["choices"]
        assert choice["text"] == "Write:" and choice["finish_reason"] == "length"
        lp, usage = choice["logprobs"], r.json()["usage"]
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in prompt]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(prompt)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs 0: the prompt's own token only
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(prompt)


def test_vllm_prompt_logprobs_on_completions_and_chat():
    tok = small_tokenizer()
    client = client_for()
    prompt = tok.encode("The sea")
    [choice] = post(client, prompt=prompt, prompt_logprobs=2, max_tokens=2).json()["choices"]
    assert "prompt_logprobs" not in post(client, prompt=prompt, max_tokens=2).json()["choices"][0]
    plps = choice["prompt_logprobs"]
    assert len(plps) == len(prompt) and plps[0] is None
    for token_id, entry in zip(prompt[1:], plps[1:]):
        mine = entry[str(token_id)]
        assert mine == {"logprob": pytest.approx(-math.log(tok.vocab_size)), "rank": 1,
                        "decoded_token": tok.decode([token_id])}
        assert 2 <= len(entry) <= 3 and {e["rank"] for k, e in entry.items() if k != str(token_id)} <= {1, 2}
    assert choice["logprobs"] is None  # prompt logprobs are not the reply's
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "prompt_logprobs": 0, "max_tokens": 2}).json()
    calls = engine_of(client.app).calls
    assert len(body["prompt_logprobs"]) == len(calls[-1].prompt_ids) and body["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in body["prompt_logprobs"][1:])


def test_truncate_prompt_tokens_keeps_the_prompts_end():
    """vLLM's truncate_prompt_tokens: the last k tokens (-1: the context's length), echoed as the model saw them."""
    tok = small_tokenizer()
    client = client_for(max_model_len=64)
    ids = tok.encode("one two three four five six")
    body = post(client, prompt=ids, truncate_prompt_tokens=3, echo=True, max_tokens=1).json()
    assert engine_of(client.app).calls[-1].prompt_ids == ids[-3:]
    assert body["choices"][0]["text"].startswith(tok.decode(ids[-3:])) and body["usage"]["prompt_tokens"] == 3
    post(client, prompt=list(range(100, 180)), truncate_prompt_tokens=-1, max_tokens=None)
    assert engine_of(client.app).calls[-1].prompt_ids == list(range(117, 180))  # the context's 64, less one to reply
    r = post(client, prompt=list(range(100, 180)), truncate_prompt_tokens=-1, max_tokens=10)
    assert r.status_code == 200 and engine_of(client.app).calls[-1].prompt_ids == list(range(126, 180))
    for bad in (0, 65, -2):
        r = post(client, prompt=ids, truncate_prompt_tokens=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", bad
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "truncate_prompt_tokens": 2, "max_tokens": 2})
    assert chat.status_code == 200 and len(engine_of(client.app).calls[-1].prompt_ids) == 2


def offsets_index(text: str, lp: dict, skipped: tuple[str, ...] = ()) -> bool:
    """Each whole token's string starts at its offset in the text (half characters show as U+FFFD;
    skipped special tokens are not in it)."""
    return all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"])
               if "\ufffd" not in t and t not in skipped)


@pytest.mark.parametrize("skip", [True, False])
def test_echoed_prompts_are_decoded_as_the_reply_so_the_offsets_index_them(skip):
    """Special tokens in the prompt ([gMASK]<sop> as lm-eval's tokenizer adds them, a literal <|user|>)
    are skipped or kept in the echo as in the reply, and the text offsets index what is sent."""
    tok = small_tokenizer()
    client = client_for()
    shown = (lambda s: s) if not skip else (lambda s: s.replace("[gMASK]<sop>", "").replace("<|user|>", ""))
    for prompt in (tok.with_prefix(tok.encode("hello")), "<|user|>hi there"):
        ids = prompt if isinstance(prompt, list) else tok.with_prefix(tok.encode(prompt, allow_special=True))
        for max_tokens in (0, 3):
            body = post(client, prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens,
                        skip_special_tokens=skip).json()
            [choice] = body["choices"]
            echoed = shown(tok.decode(ids, skip_special_tokens=False))
            assert choice["text"].startswith(echoed), (prompt, choice["text"])
            skipped = ("[gMASK]", "<sop>", "<|user|>") if skip else ()
            assert offsets_index(choice["text"], choice["logprobs"], skipped), (prompt, choice)


def test_a_prompt_that_ends_inside_a_character_keeps_the_replys_offsets_right():
    """The echo and the reply are decoded apart (the engine decodes the reply afresh): a character the
    prompt leaves unfinished is U+FFFD in both, and the reply's offsets count it so."""
    tok = small_tokenizer()
    ids = tok.encode("hel😀ok")
    cut = ids.index(246)  # the prompt ends after two of the emoji's four bytes, the reply has the other two
    client = client_for(ids[cut:])
    body = post(client, prompt=ids[:cut], echo=True, logprobs=0, max_tokens=3, temperature=0).json()
    [choice] = body["choices"]
    assert choice["text"] == "hel\ufffd" + "\ufffd\ufffdok" and offsets_index(choice["text"], choice["logprobs"])
    assert choice["logprobs"]["text_offset"] == [0, 2, 3, 3, 4, 5, 6]  # he l (2 bytes) | (byte) (byte) ok


def test_a_prompt_that_fills_the_context_can_be_scored_alone():
    client = client_for(max_model_len=64)
    body = post(client, prompt=list(range(100, 164)), echo=True, logprobs=0, max_tokens=0).json()
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 64 and body["usage"]["completion_tokens"] == 0
    too_long = post(client, prompt=list(range(100, 165)), echo=True, logprobs=0, max_tokens=0)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_priority_reaches_the_engine_under_the_priority_policy():
    assert "--scheduling-policy priority" in post(client_for(), prompt="Hi", priority=1).json()["error"]["message"]
    client = client_for(scheduling_policy="priority")
    assert post(client, prompt="Hi", priority=7).status_code == 200
    assert engine_of(client.app).calls[-1].params.priority == 7


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id():
    tok = small_tokenizer()
    ids = tok.encode(REPLY)[:4]
    as_text = post(client_for(), prompt="Write:", logprobs=2, max_tokens=4).json()["choices"][0]["logprobs"]
    for client, extra in ((client_for(), {"return_tokens_as_token_ids": True}),
                          (client_for(return_tokens_as_token_ids=True), {})):  # the server's default
        lp = post(client, prompt="Write:", logprobs=2, max_tokens=4, **extra).json()["choices"][0]["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in ids]
        assert lp["text_offset"] == as_text["text_offset"] and lp["token_logprobs"] == as_text["token_logprobs"]
        for token, top in zip(lp["tokens"], lp["top_logprobs"]):
            assert token in top and all(k.startswith("token_id:") for k in top)
    off = client_for(return_tokens_as_token_ids=True)  # a request may turn the server's default off
    lp = post(off, prompt="Write:", logprobs=0, max_tokens=4, return_tokens_as_token_ids=False).json()
    assert lp["choices"][0]["logprobs"]["tokens"] == as_text["tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_string_or_token_as_vllm_does(stream):
    """vLLM's stop_reason: the stop string or stop token id that ended the choice; None for the tokenizer's
    end of text (GLM-4's <|endoftext|>, not its other stop tokens) and for a length cut."""
    tok = small_tokenizer()
    user = tok.special_tokens["<|user|>"]
    client = client_for(" the sea<|user|>", " the sea is wide and deep")

    def reasons(**body) -> list[tuple[str, object]]:
        r = post(client, prompt="Write:", n=2, stream=stream, **body)
        if not stream:
            return [(c["finish_reason"], c["stop_reason"]) for c in r.json()["choices"]]
        last = {c["choices"][0]["index"]: c["choices"][0] for c in sse_json(r.text) if c["choices"]
                and c["choices"][0]["finish_reason"]}
        assert all("stop_reason" not in c["choices"][0] for c in sse_json(r.text) if c["choices"]
                   and not c["choices"][0]["finish_reason"])
        return [(last[i]["finish_reason"], last[i]["stop_reason"]) for i in range(2)]

    assert reasons(max_tokens=50) == [("stop", user), ("stop", None)]  # the second ends with <|endoftext|>
    assert reasons(stop=[" is"], max_tokens=50) == [("stop", user), ("stop", " is")]
    assert reasons(max_tokens=1) == [("length", None), ("length", None)]


def test_return_token_ids_gives_each_choices_tokens_and_its_prompts():
    tok = small_tokenizer()
    reply = " caf\u00e9 au lait"  # a character split across tokens is held back while streaming
    client = client_for(reply)
    body = post(client, prompt="Write:", return_token_ids=True, max_tokens=50).json()
    [call] = engine_of(client.app).calls
    [choice] = body["choices"]
    stop = tok.stop_token_ids[0]
    assert choice["prompt_token_ids"] == call.prompt_ids
    assert choice["token_ids"] == tok.encode(reply) + [stop]  # the stop token too, as generated (vLLM's)
    chunks = [c["choices"][0] for c in sse_json(post(client, prompt="Write:", return_token_ids=True, stream=True,
                                                     max_tokens=50).text)]
    assert chunks[0]["prompt_token_ids"] == call.prompt_ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == tok.encode(reply) + [stop]
    assert tok.decode([t for c in chunks for t in c["token_ids"]][:-1]) == "".join(c["text"] for c in chunks)
    plain = post(client, prompt="Write:", max_tokens=50).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


@pytest.mark.parametrize("stream", [False, True])
def test_choices_past_max_num_seqs_count_the_prompt_as_computed_once(stream):
    # the choices past max_num_seqs run after the first two and find the prompt in the prefix cache
    client = client_for(max_num_seqs=2)
    r = post(client, prompt="Write: " * 40, n=3, stream=stream,
             stream_options={"include_usage": True} if stream else None)
    assert r.status_code == 200
    indices, usage = choice_indices_and_usage(r, stream)
    assert indices == [0, 1, 2]
    [call] = engine_of(client.app).calls
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}
    assert engine_of(client.app).engine.scheduler.prefix_cache_hits > 0
