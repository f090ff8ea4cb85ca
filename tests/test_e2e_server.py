"""End to end: the real server (uvicorn subprocess, our engine, a random GLM-4 checkpoint, on the test
device: `--device`) driven by the official openai client with strict response validation, and by raw
HTTP for the wire format."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from server_proc import ServerProcess
from steering import write_steered_checkpoint

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


@pytest.fixture(scope="module")
def server(make_checkpoint, device):
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--served-model-name", "glm4-test",
                      device=device).wait_healthy()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def steered(tmp_path_factory, device):
    path = write_steered_checkpoint(tmp_path_factory.mktemp("steered"),
                                    ["<|assistant|>", 'get_weather\n{"city": "北京"}', "<|observation|>"])
    s = ServerProcess(path, "--served-model-name", "glm4-steered", device=device).wait_healthy()
    yield s
    s.stop()


def client(s: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, _strict_response_validation=True)


def wait_idle(s: ServerProcess, timeout=20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = s.metrics()
        if m["glm4serve:num_requests_running"] == 0 and m["glm4serve:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {m}")
        time.sleep(0.1)


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something, 你好"}]


def test_models_health_ping(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["glm4-test"]
    raw = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert raw["max_model_len"] == 131072 or raw["max_model_len"] > 0
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_server_goes_on(server):
    """What an operator (or a test whose server does not come up) gets from `kill -USR1`."""
    server.dump_stacks()
    log = server.log_path.read_text()
    assert "Current thread" in log or "Thread 0x" in log, log[-2000:]
    assert 'File "' in log and "uvicorn" in log
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_stream_and_whole_give_the_same_text_at_temperature_0(server):
    c = client(server)
    whole = c.chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop")
    pieces, finish, usage = [], None, None
    stream = c.chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_responses_api_whole_and_through_the_sdk_stream_helper(server):
    c = client(server)
    whole = c.responses.create(model="glm4-test", input=MSGS, instructions="Answer briefly.", max_output_tokens=24,
                               temperature=0)
    assert whole.status in ("completed", "incomplete") and whole.output[0].type == "message"
    chat = c.chat.completions.create(model="glm4-test", max_tokens=24, temperature=0,
                                     messages=[{"role": "system", "content": "Answer briefly."}, *MSGS])
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.usage.output_tokens == chat.usage.completion_tokens
    with c.responses.stream(model="glm4-test", input=MSGS, instructions="Answer briefly.", max_output_tokens=24,
                            temperature=0) as stream:
        events = list(stream)
    # a reply cut by max_output_tokens ends with response.incomplete (get_final_response wants .completed)
    assert events[-1].type == f"response.{whole.status}"
    final = events[-1].response
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    counted = c.responses.input_tokens.count(model="glm4-test", input=MSGS, instructions="Answer briefly.")
    assert counted.input_tokens == whole.usage.input_tokens


def test_a_repeated_prompt_reports_its_cached_tokens(server):
    c = client(server)
    messages = [{"role": "user", "content": " ".join(f"word{i}" for i in range(120)) + " (cached tokens)"}]
    first = c.chat.completions.create(model="glm4-test", messages=messages, max_tokens=2, temperature=0).usage
    again = c.chat.completions.create(model="glm4-test", messages=messages, max_tokens=2, temperature=0).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    # whole KV blocks, short of the last prompt token, which is always computed
    assert first.prompt_tokens - 32 < again.prompt_tokens_details.cached_tokens < first.prompt_tokens


def test_n2_seeded_and_logprobs(server):
    c = client(server)
    r = c.chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=8, n=2, temperature=1.0, seed=3,
                                  logprobs=True, top_logprobs=3)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices)
    for ch in r.choices:
        for lp in ch.logprobs.content:
            assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
            assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
    again = c.chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]


def test_stop_string_cuts_the_reply(server):
    c = client(server)
    full = c.completions.create(model="glm4-test", prompt="Once upon a time", max_tokens=24, temperature=0).choices[0]
    text = full.text
    words = [w for w in text.split() if len(w) >= 2 and text.index(w) > 0]
    if not words:
        pytest.fail(f"no usable stop string in {text!r}")
    stop = words[0]
    cut = c.completions.create(model="glm4-test", prompt="Once upon a time", max_tokens=24, temperature=0,
                               stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_completions_text_and_token_ids(server):
    c = client(server)
    tok = httpx.post(server.url + "/tokenize", json={"model": "glm4-test", "prompt": "Hello there"}).json()
    ids = tok["tokens"]
    back = httpx.post(server.url + "/detokenize", json={"model": "glm4-test", "tokens": ids}).json()
    assert back["prompt"].endswith("Hello there")
    by_text = c.completions.create(model="glm4-test", prompt="Hello there", max_tokens=6, temperature=0)
    by_ids = c.completions.create(model="glm4-test", prompt=ids, max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)


def test_scoring_a_prompt_as_evaluation_harnesses_do_gives_transformers_logprobs(server, make_checkpoint, device):
    """lm-evaluation-harness's log-likelihood request through the SDK (token ids, echo, logprobs=1,
    max_tokens=1), and `max_tokens=0`: every prompt token's logprob is transformers' on the same weights."""
    from transformers import AutoModelForCausalLM

    from glm4serve.model.tokenizer import Tokenizer

    # the SDK's types have no null logprob, which the first prompt token gets (as from OpenAI and vLLM):
    # its default client does not validate, only this suite's strict one
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The sea is wide, 海很宽"}).json()["tokens"]
    scored = c.completions.create(model="glm4-test", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    alone = c.completions.create(model="glm4-test", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    path = make_checkpoint("glm", "hf", "wide")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    # over the tokenizer's ids, as the server samples: the output layer's padding rows past them are no
    # tokens (a trained model leaves them next to no mass; random weights give them their share)
    vocab = Tokenizer.from_dir(path).vocab_size
    with torch.no_grad():
        expected = ref(torch.tensor([ids], device=device)).logits[0, :, :vocab].float().log_softmax(-1).cpu()
    want = [expected[p - 1, ids[p]].item() for p in range(1, len(ids))]
    for completion, extra in ((scored, 1), (alone, 0)):
        lp = completion.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + extra and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-3)
        # lm-eval's is_greedy: the token is its position's likeliest
        greedy = [expected[p - 1].argmax().item() == ids[p] for p in range(1, len(ids))]
        assert [lp.token_logprobs[p] == max(lp.top_logprobs[p].values()) for p in range(1, len(ids))] == greedy
    assert alone.choices[0].finish_reason == "length" and alone.usage.completion_tokens == 0
    assert alone.choices[0].text == scored.choices[0].text[: len(alone.choices[0].text)]


def test_metrics_move_after_requests(server):
    before = server.metrics()
    client(server).chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=5, temperature=0)
    after = wait_idle(server)
    assert after["glm4serve:prompt_tokens_total"] > before["glm4serve:prompt_tokens_total"]
    assert after["glm4serve:generation_tokens_total"] >= before["glm4serve:generation_tokens_total"] + 5
    assert after["glm4serve:e2e_request_latency_seconds_count"] > before["glm4serve:e2e_request_latency_seconds_count"]


def test_disconnect_mid_stream_frees_the_kv_blocks(server):
    body = {"model": "glm4-test", "messages": MSGS, "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept alive: closing this iterator would close the connection
        seen = 0
        while seen < 5:
            seen += next(lines).startswith("data: ")
        m = server.metrics()
        assert m["glm4serve:num_requests_running"] == 1 and m["glm4serve:kv_cache_usage_perc"] > 0, m
    wait_idle(server)  # the engine aborted the request and took its blocks back


def test_bad_requests_get_4xx_and_the_server_stays_healthy(server):
    bad = [
        b"{not json",
        {"model": "glm4-test"},
        {"model": "glm4-test", "messages": []},
        {"model": "glm4-test", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "glm4-test", "messages": MSGS, "max_tokens": -1},
        {"model": "glm4-test", "messages": MSGS, "temperature": -0.5},
        {"model": "glm4-test", "messages": MSGS, "tool_choice": "auto"},
        {"model": "glm4-test", "messages": MSGS, "n": 0},
        {"model": "glm4-test", "messages": MSGS, "max_tokens": 10_000_000},
        {"model": "nope", "messages": MSGS},
    ]
    for body in bad:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + "/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="glm4-test", messages=MSGS, max_tokens=10_000_000)
    assert e.value.code == "context_length_exceeded"


def test_steered_tool_call_whole(steered):
    r = client(steered).chat.completions.create(
        model="glm4-steered", messages=[{"role": "user", "content": "Weather in Beijing?"}], tools=TOOLS,
        temperature=0, max_tokens=40)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}


def test_steered_tool_call_with_a_response_format_for_the_final_answer(steered):
    """An agent with tools and a structured final answer (the Agents SDK's output_type): the model that
    calls a tool still calls it, through the chat route and the Responses API."""
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {
        "type": "object", "properties": {"sky": {"type": "string"}}, "required": ["sky"],
        "additionalProperties": False}}}
    r = client(steered).chat.completions.create(
        model="glm4-steered", messages=[{"role": "user", "content": "Weather in Beijing?"}], tools=TOOLS,
        response_format=fmt, temperature=0, max_tokens=40)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
    reply = client(steered).responses.create(
        model="glm4-steered", input="Weather in Beijing?", temperature=0, max_output_tokens=40,
        tools=[{"type": "function", **TOOLS[0]["function"]}],
        text={"format": {"type": "json_schema", **fmt["json_schema"]}})
    [item] = reply.output
    assert (item.type, item.name, json.loads(item.arguments)) == ("function_call", "get_weather", {"city": "北京"})


def test_steered_tool_call_through_the_sdk_stream_helper(steered):
    with client(steered).chat.completions.stream(
        model="glm4-steered", messages=[{"role": "user", "content": "Weather in Beijing?"}], tools=TOOLS,
        temperature=0, max_tokens=40,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    ch = final.choices[0]
    assert ch.finish_reason == "tool_calls"
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}


def test_steered_function_call_through_the_responses_api(steered):
    c = client(steered)
    tool = {"type": "function", **TOOLS[0]["function"]}
    r = c.responses.create(model="glm4-steered", input="Weather in Beijing?", tools=[tool], temperature=0,
                           max_output_tokens=40)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    assert json.loads(call.arguments) == {"city": "北京"}
    follow_up = [{"role": "user", "content": "Weather in Beijing?"},
                 {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 20°C"}]
    again = c.responses.create(model="glm4-steered", input=follow_up, tools=[tool], temperature=0, max_output_tokens=8)
    assert again.usage.input_tokens > r.usage.input_tokens
    # the same turn as a follow-up of the stored response
    chained = c.responses.create(model="glm4-steered", previous_response_id=r.id, tools=[tool], temperature=0,
                                 max_output_tokens=8, input=follow_up[2:])
    assert chained.previous_response_id == r.id and chained.usage.input_tokens == again.usage.input_tokens
    assert c.responses.retrieve(chained.id) == chained
    items = list(c.responses.input_items.list(chained.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == call.call_id and items[2].output == "sunny, 20°C"
    c.responses.delete(chained.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(chained.id)


def test_steered_reply_without_tools_is_plain_text_and_a_cut_call_is_length(steered):
    c = client(steered)
    plain = c.chat.completions.create(model="glm4-steered", messages=[{"role": "user", "content": "hi"}],
                                      temperature=0, max_tokens=40).choices[0]
    assert plain.finish_reason == "stop" and plain.message.content == 'get_weather\n{"city": "北京"}'
    cut = c.chat.completions.create(model="glm4-steered", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                    temperature=0, max_tokens=5).choices[0]
    assert cut.finish_reason == "length"


def test_speculative_decoding_gives_the_plain_servers_replies(server, make_checkpoint, device):
    """A server drafting by prompt lookup answers as the plain one: greedy chat with logprobs, streamed
    and whole, and seeded sampled completions; its /metrics count the drafts."""
    spec = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--served-model-name", "glm4-test",
                         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, '
                         '"prompt_lookup_max": 3, "prompt_lookup_min": 1}', device=device).wait_healthy()
    try:
        for text in ("Repeat after me: one two three, one two three, one two three.", "Hello there"):
            messages = [{"role": "user", "content": text}]
            kw = dict(model="glm4-test", messages=messages, max_tokens=40, temperature=0, logprobs=True,
                      top_logprobs=2)
            want = client(server).chat.completions.create(**kw).choices[0]
            got = client(spec).chat.completions.create(**kw).choices[0]
            assert got.message.content == want.message.content and got.finish_reason == want.finish_reason
            for a, b in zip(got.logprobs.content, want.logprobs.content, strict=True):
                assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
            chunks = list(client(spec).chat.completions.create(**kw, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.message.content
            kw = dict(model="glm4-test", prompt=text, max_tokens=30, temperature=1.0, seed=11, n=2)
            assert ([c.text for c in client(spec).completions.create(**kw).choices]
                    == [c.text for c in client(server).completions.create(**kw).choices])
        m = spec.metrics()
        drafted, kept = (m[f"glm4serve:spec_decode_num_{what}_tokens_total"] for what in ("draft", "accepted"))
        assert drafted > kept > 0
        wait_idle(spec)
    finally:
        spec.stop()


def test_a_server_over_an_fp8_kv_cache_answers_and_frees_its_blocks(make_checkpoint, device):
    """--kv-cache-dtype fp8 (CPU): chat whole and streamed give one text, a completion its logprobs, and the blocks
    come back once idle; the startup log names the cache's dtype."""
    if device != "cpu":
        pytest.skip("an fp8 KV cache runs on CPU only")
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--served-model-name", "glm4-test",
                      "--kv-cache-dtype", "fp8").wait_healthy()
    try:
        kw = dict(model="glm4-test", messages=MSGS, max_tokens=30, temperature=0)
        whole = client(s).chat.completions.create(**kw).choices[0].message.content
        chunks = list(client(s).chat.completions.create(**kw, stream=True))
        assert whole and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
        got = client(s).completions.create(model="glm4-test", prompt="Hello", max_tokens=5, logprobs=2).choices[0]
        assert len(got.logprobs.tokens) == 5 and all(lp <= 0 for lp in got.logprobs.token_logprobs)
        wait_idle(s)
    finally:
        s.stop()
    assert "float8_e4m3fn" in s.log_path.read_text()


@pytest.mark.cuda
def test_bf16_server_with_the_automatic_kv_budget(make_checkpoint):
    """As a GPU user runs it: bf16, no --kv-cache-memory (the cache takes what the weights leave of
    the card); whole and streamed chat, completions, concurrent requests, back to idle, SIGTERM."""
    s = ServerProcess(make_checkpoint("glm", "hf", "wide"), "--served-model-name", "glm4-bf16", device="cuda",
                      dtype="bfloat16", kv_cache_memory=None).wait_healthy()
    try:
        kv_gib = float(re.search(r"KV cache \d+ blocks of \d+ tokens \(([\d.]+) GiB\)", s.log_path.read_text())[1])
        assert kv_gib > 0.5 * torch.cuda.get_device_properties(0).total_memory / 2**30
        c = client(s)
        whole = c.chat.completions.create(model="glm4-bf16", messages=MSGS, max_tokens=16, temperature=0)
        assert whole.choices[0].finish_reason in ("length", "stop") and 0 < whole.usage.completion_tokens <= 16
        stream = c.chat.completions.create(model="glm4-bf16", messages=MSGS, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens > 0
        done = c.completions.create(model="glm4-bf16", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert done.usage.completion_tokens > 0

        def chat(i):
            return c.chat.completions.create(
                model="glm4-bf16", messages=[{"role": "user", "content": f"request {i}: " + "word " * (3 * i)}],
                max_tokens=24, temperature=0.8, seed=i, extra_body={"ignore_eos": True}).usage.completion_tokens

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(chat, range(8))) == [24] * 8
        assert wait_idle(s)["glm4serve:generation_tokens_total"] >= 8 * 24
    finally:
        code = s.stop()
    assert code == 0 and "Traceback" not in s.log_path.read_text()
