"""/v1/chat/completions over the real engine and a scripted model runner: wire format, whole and streamed."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from glm4serve.api.settings import ServerSettings
from tests.api_fakes import (  # noqa: F401 - shutdown_engines is an autouse fixture
    MODEL,
    choice_indices_and_usage,
    engine_of,
    full_blocks,
    make_app,
    shutdown_engines,
    small_tokenizer,
    sse_events,
    sse_json,
    wait_idle,
)

USER_HI = [{"role": "user", "content": "hi"}]


def token_pieces(text: str) -> list[str]:
    """The text delta of each token of `text` (single-byte pieces here: ASCII replies)."""
    tok = small_tokenizer()
    return [tok.decode([t]) for t in tok.encode(text)]


def client_for(**kw) -> TestClient:
    return TestClient(make_app(**kw))


def test_whole_reply_renders_prompt_and_reports_usage():
    client = client_for()
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER_HI})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    # The model's "\n" (GLM-4's empty metadata line) is not part of the content.
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello there!", "tool_calls": None},
                      "logprobs": None, "finish_reason": "stop", "stop_reason": None}  # None: <|endoftext|>
    [call] = engine_of(client.app).calls
    assert small_tokenizer().decode(call.prompt_ids) == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    reply_tokens = len(small_tokenizer().encode("\nHello there!")) + 1  # + the stop token
    assert body["usage"] == {"prompt_tokens": len(call.prompt_ids), "completion_tokens": reply_tokens,
                             "total_tokens": len(call.prompt_ids) + reply_tokens,
                             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}}


def test_stream_exact_chunk_sequence():
    r = client_for().post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL and isinstance(c["created"], int)
        assert "usage" not in c  # only with stream_options.include_usage
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks]
    pieces = token_pieces("Hello there!")
    assert deltas == [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces] + [{}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


def test_stream_include_usage_adds_final_usage_chunk():
    client = client_for()
    long_hi = [{"role": "user", "content": "hi " * 24}]  # whole KV blocks: the cache counts are not all 0
    r = client.post("/v1/chat/completions", json={
        "messages": long_hi, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_json(r.text)
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(small_tokenizer().encode("\nHello there!")) + 1
    [call] = engine_of(client.app).calls
    assert last["usage"]["prompt_tokens"] == len(call.prompt_ids)
    assert full_blocks(call) > 0
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": full_blocks(call)}
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    assert all(c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "stop"


# With n > 1 every choice samples its first token from the same logits (the engine forks after the
# prompt): both replies start with GLM-4's "\n".
TWO_REPLIES = ["\nHello there!", "\nHi"]


def test_stream_n2_each_choice_streams_and_finishes_on_its_own():
    chunks = sse_json(client_for(replies=TWO_REPLIES).post("/v1/chat/completions", json={
        "messages": USER_HI, "stream": True, "n": 2}).text)
    order = [c["choices"][0]["index"] for c in chunks]
    assert order[:2] == [0, 1]  # both role chunks first
    assert order != sorted(order)  # interleaved, not one choice after the other
    for i, expected in enumerate(["Hello there!", "Hi"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["delta"].get("content", "") for ch in mine) == expected
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "stop"
        assert [ch["finish_reason"] for ch in mine[:-1]] == [None] * (len(mine) - 1)
    # the shorter reply finished first
    finishes = [k for k, c in enumerate(chunks) if c["choices"][0]["finish_reason"]]
    assert chunks[finishes[0]]["choices"][0]["index"] == 1


def test_whole_n2_and_logprobs_shape():
    client = client_for(replies=TWO_REPLIES)
    body = client.post("/v1/chat/completions", json={
        "messages": USER_HI, "n": 2, "logprobs": True, "top_logprobs": 3}).json()
    [call] = engine_of(client.app).calls
    assert call.params.logprobs == 3 and call.params.n == 2
    for choice, reply in zip(body["choices"], TWO_REPLIES):
        entries = choice["logprobs"]["content"]
        # the reply's tokens but its opening "\n", which the content leaves out, and the stop token
        assert len(entries) == len(small_tokenizer().encode(reply))
        for e in entries:
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
            assert len(e["top_logprobs"]) == 3
            assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
            # the runner's logits: the token 40 over all others, which are equal
            assert e["logprob"] == pytest.approx(0, abs=1e-6)
            assert e["top_logprobs"][0] == {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
            assert [t["logprob"] for t in e["top_logprobs"][1:]] == pytest.approx([-40, -40], abs=1e-3)
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) + 1 for c in body["choices"])


def test_stream_logprobs_cover_every_token():
    chunks = sse_json(client_for().post("/v1/chat/completions", json={
        "messages": USER_HI, "stream": True, "logprobs": True}).text)
    entries = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    # every token but the opening "\n", which the content leaves out: the entries read as the content
    assert [e["token"] for e in entries][:-1] == token_pieces("\nHello there!")[1:]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "".join(e["token"] for e in entries[:-1]) == content == "Hello there!"
    assert all(e["top_logprobs"] == [] for e in entries)  # logprobs without top_logprobs: none listed


def test_logprobs_leave_out_only_the_newline_the_content_leaves_out():
    """Only an opening "\\n" token goes, as the content's: a reply opening otherwise keeps every entry, and a
    later "\\n" stays."""
    for reply, content in (("Hi\nyou", "Hi\nyou"), ("\nA\nB", "A\nB")):
        client = client_for(replies=[reply])
        body = client.post("/v1/chat/completions", json={"messages": USER_HI, "logprobs": True}).json()
        [choice] = body["choices"]
        assert choice["message"]["content"] == content
        assert "".join(e["token"] for e in choice["logprobs"]["content"][:-1]) == content
    # without the generation prompt nothing is left out of either
    client = client_for(replies=["\nHi"])
    body = client.post("/v1/chat/completions", json={
        "messages": USER_HI, "logprobs": True, "add_generation_prompt": False}).json()
    assert "".join(e["token"] for e in body["choices"][0]["logprobs"]["content"][:-1]) == "\nHi"


def test_max_tokens_cuts_with_length():
    client = client_for()
    body = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "".join(token_pieces("\nHello there!")[:3]).lstrip("\n")
    assert body["usage"]["completion_tokens"] == 3
    # max_completion_tokens wins over max_tokens
    client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 3, "max_completion_tokens": 5})
    assert engine_of(client.app).calls[-1].params.max_tokens == 5


def test_default_max_tokens_is_the_rest_of_the_context():
    client = client_for(max_model_len=200)
    client.post("/v1/chat/completions", json={"messages": USER_HI})
    call = engine_of(client.app).calls[0]
    assert call.params.max_tokens == 200 - len(call.prompt_ids)


def test_request_fields_reach_sampling_params():
    client = client_for()
    # ignore_eos: the reply's stop token does not end it, max_tokens does
    r = client.post("/v1/chat/completions", json={
        "messages": USER_HI, "temperature": 0.3, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "seed": 11,
        "stop": "xyz", "logit_bias": {"17": -2.5}, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5],
        "include_stop_str_in_output": True, "skip_special_tokens": False, "max_tokens": 12})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    p = engine_of(client.app).calls[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens) == (0.3, 0.9, 7, 0.05, 11, 12)
    assert p.stop == ["xyz"] and p.logit_bias == {17: -2.5} and p.stop_token_ids == [5]
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0.5, -0.5, 1.2, 2)
    assert p.ignore_eos and p.include_stop_str_in_output and not p.skip_special_tokens
    client.post("/v1/chat/completions", json={"messages": USER_HI, "stop": ["a", "b"]})
    assert engine_of(client.app).calls[1].params.stop == ["a", "b"]


def test_content_parts_and_developer_role_render_as_text():
    client = client_for()
    client.post("/v1/chat/completions", json={"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]})
    prompt = small_tokenizer().decode(engine_of(client.app).calls[0].prompt_ids)
    # parts joined by "\n", as the chat module (and vLLM) joins them
    assert prompt == "[gMASK]<sop><|system|>\nbe brief<|user|>\nhi\nthere<|assistant|>"


def test_media_parts_stand_in_the_prompt_as_a_line_saying_they_were_left_out():
    # Open WebUI, LangChain, Continue send images as image_url parts, and resend them every later turn
    client = client_for()
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                     {"type": "file", "file": {"file_id": "f"}}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot see it"}]},
        {"role": "user", "content": "and now?"}]})
    assert r.status_code == 200
    prompt = small_tokenizer().decode(engine_of(client.app).calls[0].prompt_ids)
    assert prompt == ("[gMASK]<sop><|user|>\nwhat is this\n[an image left out: this model reads text only]\n"
                      "[audio left out: this model reads text only]\n[a file left out: this model reads text only]"
                      "<|assistant|>\nI cannot see it<|user|>\nand now?<|assistant|>")


def test_an_empty_functions_list_offers_no_functions():
    client = client_for()
    assert client.post("/v1/chat/completions", json={"messages": USER_HI, "functions": [],
                                                     "function_call": None}).status_code == 200


def test_keepalive_is_an_sse_comment():
    client = client_for(replies=["\nHi!"], step_delay=0.15, sse_ping_seconds=0.05)
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    events = sse_events(r.text)
    assert ": ping" in events
    assert all(e == ": ping" or e.startswith("data: ") for e in events)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in sse_json(r.text)) == "Hi!"


def test_engine_error_after_stream_start_is_an_error_event_then_done():
    client = client_for(fail_after_steps=3)  # the model's 4th forward raises
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True})
    assert r.status_code == 200
    chunks = sse_json(r.text)
    assert "error" in chunks[-1] and chunks[-1]["error"]["type"] == "server_error"
    assert all("error" not in c for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hel"
    wait_idle(engine_of(client.app))


def test_engine_error_whole_is_500_and_the_server_keeps_serving():
    client = client_for(fail_after_steps=2)
    r = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    engine = engine_of(client.app)
    wait_idle(engine)  # the failed request's blocks are back
    engine.runner.fail_after_steps = None
    assert client.post("/v1/chat/completions", json={"messages": USER_HI}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_n_past_max_num_seqs_is_served_and_its_prompt_counted_once(stream):
    # vLLM serves it: the engine runs the choices a group of max_num_seqs at a time; the later groups find
    # the prompt in the prefix cache, but the request computed it once, as choice 0 did
    client = client_for(max_num_seqs=2)
    body = {"messages": [{"role": "user", "content": "hi " * 40}], "stream": stream, "n": 3,
            "stream_options": {"include_usage": True} if stream else None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    indices, usage = choice_indices_and_usage(r, stream)
    assert indices == [0, 1, 2]
    assert usage["prompt_tokens"] > 32 and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert engine_of(client.app).engine.scheduler.prefix_cache_hits > 0  # the later groups' hits


def test_engine_side_abort_is_not_reported_as_a_normal_finish():
    client = client_for(abort_after_tokens=2)  # the server aborts each request after its 2nd token
    r = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert r.status_code == 503 and r.json()["error"]["message"]
    chunks = sse_json(client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True}).text)
    assert "error" in chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    wait_idle(engine_of(client.app))


def test_continue_final_message_ends_the_prompt_inside_the_reply_begun():
    """vLLM's continue_final_message: the prompt ends with the final assistant text (no generation
    prompt), the reply goes on from it; /tokenize renders the same prompt."""
    client = client_for()
    begun = USER_HI + [{"role": "assistant", "content": "Well,"}]
    r = client.post("/v1/chat/completions", json={"messages": begun, "continue_final_message": True})
    assert r.status_code == 200
    [call] = engine_of(client.app).calls
    assert small_tokenizer().decode(call.prompt_ids) == "[gMASK]<sop><|user|>\nhi<|assistant|>\nWell,"
    assert r.json()["choices"][0]["message"]["content"] == "\nHello there!"  # a continuation: nothing stripped
    tokenized = client.post("/tokenize", json={"messages": begun, "continue_final_message": True}).json()
    assert tokenized["tokens"] == call.prompt_ids
    both = client.post("/v1/chat/completions", json={"messages": begun, "continue_final_message": True,
                                                      "add_generation_prompt": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    empty = client.post("/v1/chat/completions", json={"messages": USER_HI + [{"role": "assistant", "content": ""}],
                                                       "continue_final_message": True})
    assert empty.status_code == 400 and "continue" in empty.json()["error"]["message"]


def test_continuous_usage_stats_put_the_choices_counts_so_far_in_every_chunk():
    """vLLM's stream_options.continuous_usage_stats (with include_usage), on chat and completions."""
    client = client_for()
    for route, body in (("/v1/chat/completions", {"messages": USER_HI}), ("/v1/completions", {"prompt": "hi"})):
        r = client.post(route, json={**body, "stream": True,
                                     "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        *chunks, last = sse_json(r.text)
        prompt = len(engine_of(client.app).calls[-1].prompt_ids)
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks), route
        assert counts == sorted(counts) and counts[-1] == last["usage"]["completion_tokens"] > 0, route
        assert all(c["usage"]["total_tokens"] == prompt + n for c, n in zip(chunks, counts))
        plain = sse_json(client.post(route, json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}).text)
        assert all(c["usage"] is None for c in plain[:-1]), route
        # continuous_usage_stats alone asks for usage, as vLLM takes it; an empty stream_options does not (OpenAI)
        alone = sse_json(client.post(route, json={**body, "stream": True,
                                                  "stream_options": {"continuous_usage_stats": True}}).text)
        assert all(c["usage"] is not None for c in alone) and alone[-1]["choices"] == [], route
        for options in ({}, {"include_usage": False, "continuous_usage_stats": True}):
            none = sse_json(client.post(route, json={**body, "stream": True, "stream_options": options}).text)
            assert all("usage" not in c for c in none), (route, options)


THOUGHTFUL = "\nThe user greets me.</think>\nHello!"  # GLM-Z1's reply after its prompt's `<think>`


def test_reasoning_parser_splits_the_thinking_into_reasoning_content_whole_and_streamed():
    client = client_for(replies=[THOUGHTFUL], reasoning_parser="deepseek_r1")
    body = client.post("/v1/chat/completions", json={"messages": USER_HI}).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "The user greets me." and message["content"] == "Hello!"
    thinking_tokens = len(small_tokenizer().encode("\nThe user greets me.</think>"))  # up to the tag's last token
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": thinking_tokens}
    chunks = sse_json(client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": True,
                                                                "stream_options": {"include_usage": True}}).text)
    assert chunks[-1]["usage"] == body["usage"]
    chunks = chunks[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    thinking = "".join(d.get("reasoning_content") or "" for d in deltas)
    answer = "".join(d.get("content") or "" for d in deltas)
    assert (thinking, answer) == ("The user greets me.", "Hello!")
    # vLLM's newer name beside the older one, in every delta and in the whole message
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas) and message["reasoning"] == thinking
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any(d.get("reasoning_content") for d in deltas[first_answer:])
    # off (the default): the reply is all content, as the model wrote it
    plain = client_for(replies=[THOUGHTFUL]).post("/v1/chat/completions", json={"messages": USER_HI}).json()
    assert plain["choices"][0]["message"]["content"] == THOUGHTFUL[1:]
    assert "reasoning_content" not in plain["choices"][0]["message"]
    assert "completion_tokens_details" not in plain["usage"]


def test_reasoning_then_a_tool_call_and_a_reply_cut_while_thinking():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    client = client_for(replies=['Weather, so a call.</think>get_weather\n{"city": "Paris"}'],
                        reasoning_parser="deepseek_r1")
    body = client.post("/v1/chat/completions", json={"messages": USER_HI, "tools": tools}).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "Weather, so a call." and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    cut = client_for(replies=["Thinking on and on"], reasoning_parser="deepseek_r1").post(
        "/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 3}).json()["choices"][0]
    assert cut["finish_reason"] == "length" and cut["message"]["content"] is None
    tok = small_tokenizer()
    assert cut["message"]["reasoning_content"] == tok.decode(tok.encode("Thinking on and on")[:3])


def test_a_constrained_reply_is_not_split_for_thinking():
    client = client_for(replies=['\n{"a": 1}'], reasoning_parser="deepseek_r1")
    body = client.post("/v1/chat/completions", json={"messages": USER_HI,
                                                      "response_format": {"type": "json_object"}}).json()
    assert body["choices"][0]["message"]["content"] == '{"a": 1}'
    assert "reasoning_content" not in body["choices"][0]["message"]


def test_a_think_tag_that_is_a_special_token_still_splits_the_reply():
    """Where the tokenizer has `</think>` as a special token, skipping special tokens must not drop it."""
    tok = small_tokenizer()
    end_id = tok.special_tokens["<eop>"]  # stands in for a `</think>` special token
    app = make_app(replies=[tok.encode("Hmm.") + [end_id] + tok.encode("Yes.")], reasoning_parser="deepseek_r1")
    app.state.serving.tokenizer.special_tokens["</think>"] = end_id
    body = TestClient(app).post("/v1/chat/completions", json={"messages": USER_HI}).json()
    message = body["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Hmm.", "Yes.")
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(tok.encode("Hmm.")) + 1


def test_an_assistant_token_while_thinking_is_no_call_and_no_surrogate():
    """With tools on, `<|assistant|>` decodes as the call separator mark: in the thinking it is dropped."""
    tools = [{"type": "function", "function": {"name": "get_w", "parameters": {"type": "object"}}}]
    for reply, answer in (('think<|assistant|>more</think>get_w\n{}', None), ("think<|assistant|>more", None)):
        client = client_for(replies=[reply], reasoning_parser="deepseek_r1")
        body = {"messages": USER_HI, "tools": tools}
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["reasoning_content"] == "thinkmore" and message["content"] is answer
        chunks = sse_json(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
        assert not any("error" in c for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]) \
            == "thinkmore"


def test_echo_survives_a_reply_that_never_stops_thinking():
    client = client_for(replies=["Thinking on"], reasoning_parser="deepseek_r1")
    begun = USER_HI + [{"role": "assistant", "content": "Well,"}]
    body = {"messages": begun, "echo": True, "add_generation_prompt": False}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == "Well," and message["reasoning_content"] == "Thinking on"


def test_a_long_bad_word_is_tokenized_off_the_event_loop(monkeypatch):
    import asyncio

    client = client_for()
    tokenizer, where = client.app.state.serving.tokenizer, []
    encode = tokenizer.encode

    def recording(text, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append((len(text), "event loop"))
        except RuntimeError:
            where.append((len(text), "worker thread"))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording)  # the tokenizer is shared with other tests' apps
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "bad_words": ["ab" * 10_000, "x"]})
    assert r.status_code == 200
    assert {w for n, w in where if n >= 20_000} == {"worker thread"}
    assert {w for n, w in where if n < 3} == {"event loop"}  # short ones: not worth a thread


def test_a_chat_template_given_at_start_renders_every_chat_prompt(tmp_path):
    """vLLM's --chat-template: a file or the template itself, in place of the checkpoint's."""
    template = "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n[{{ m.content }}]{% endfor %}<|assistant|>"
    (tmp_path / "t.jinja").write_text(template)
    for given in (str(tmp_path / "t.jinja"), template):
        client = client_for(chat_template=given)
        assert client.post("/v1/chat/completions", json={"messages": USER_HI}).status_code == 200
        [call] = engine_of(client.app).calls
        assert small_tokenizer().decode(call.prompt_ids) == "[gMASK]<sop><|user|>\n[hi]<|assistant|>"
        tokens = client.post("/tokenize", json={"messages": USER_HI}).json()["tokens"]
        assert tokens == call.prompt_ids
    for bad, error in ((str(tmp_path / "missing.jinja"), "cannot be read"), ("{% for %}", "does not parse: line 1")):
        with pytest.raises(ValueError, match=error):
            ServerSettings(chat_template=bad)
    # a template that fails on some input (here: one message) is a 400 for that input, not a 500
    client = client_for(chat_template="[gMASK]<sop>{{ 1 // (messages|length - 1) }}<|assistant|>")
    r = client.post("/v1/chat/completions", json={"messages": USER_HI})
    assert r.status_code == 400 and "chat template failed" in r.json()["error"]["message"]


def test_null_optional_fields_mean_their_defaults_as_the_sdks_send_them():
    """openai.OpenAI().chat.completions.create(..., n=None, presence_penalty=None) sends nulls."""
    client = client_for()
    nulls = dict.fromkeys(("n", "presence_penalty", "frequency_penalty", "logprobs", "stream", "echo", "top_k", "min_p",
                           "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                           "add_generation_prompt", "priority", "stream_options"))
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, **nulls})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello there!"
    p = engine_of(client.app).calls[0].params
    assert (p.n, p.presence_penalty, p.top_k, p.min_p, p.repetition_penalty) == (1, 0, 0, 0, 1)
    assert p.skip_special_tokens and not p.ignore_eos
    # a required field is still required, and a wrong type still a 400
    assert client.post("/v1/chat/completions", json={"messages": None}).status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": USER_HI, "n": "2"}).status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi", "name": None}]})
    assert r.status_code == 200


def test_a_newline_stop_cuts_after_the_first_line_not_at_glm4s_opening_newline():
    client = client_for(replies=["\nfirst line\nsecond"])
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": USER_HI, "stop": "\n", "stream": stream})
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        else:
            content = r.json()["choices"][0]["message"]["content"]
        assert content == "first line", stream


@pytest.mark.parametrize("stream", [False, True])
def test_include_reasoning_false_leaves_the_thinking_out(stream):
    client = client_for(replies=[THOUGHTFUL], reasoning_parser="deepseek_r1")
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "stream": stream, "include_reasoning": False})
    if stream:
        deltas = [c["choices"][0]["delta"] for c in sse_json(r.text)]
        assert not any("reasoning" in d or "reasoning_content" in d for d in deltas)
        assert "".join(d.get("content") or "" for d in deltas) == "Hello!"
    else:
        message = r.json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hello!", "tool_calls": None}
