"""Structured output in the engine: random-weight GLM-4 checkpoints (which emit noise) must still
produce JSON that parses and validates, tool calls in GLM-4's format, and unconstrained requests
that share the batch must not notice."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.guided import (
    Grammars,
    Guide,
    GuidedDecodingError,
    grammar_vocab,
    ill_formed_utf8,
    mask_logits,
    utf8_tail,
)
from glm4serve.engine.processors import SampleRow
from glm4serve.engine.sampler import Sampler, make_generator
from glm4serve.engine.types import LENGTH, STOP, ConstraintError, GuidedSpec, GuidedSpecError, SamplingParams
from glm4serve.server import build_llm_engine

# Nested objects, arrays, enums, required fields; every string and number is bounded, so even
# a random model's reply can finish.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "北京", "Lagos"]},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
}

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}}, "required": ["tz"]}


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    return build_llm_engine(EngineArgs(model=str(make_checkpoint()), dtype="float32", kv_cache_memory=32 << 20,
                                       max_model_len=1024))


def prompt(engine, text="Tell me about someone.") -> list[int]:
    return engine.tokenizer.encode(f"[gMASK]<sop><|user|>\n{text}<|assistant|>")


def run(engine, requests) -> dict:
    """requests: [(request_id, prompt_ids, params)] -> {(request_id, index): (text, finish_reason, token_ids)}"""
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    text, finish, tokens = {}, {}, {}
    for _ in range(5000):
        if not engine.has_work:
            break
        for o in engine.step():
            key = (o.request_id, o.index)
            text[key] = text.get(key, "") + o.text
            tokens.setdefault(key, []).extend(o.token_ids)
            if o.finish_reason is not None:
                finish[key] = o.finish_reason
    assert not engine.has_work
    assert engine.pool.num_free == engine.pool.num_blocks
    return {k: (text[k], finish.get(k), tokens[k]) for k in text}


def test_fifty_seeded_sampled_replies_all_validate(engine):
    spec = GuidedSpec.json_schema(PERSON)
    reqs = [(f"p{i}", prompt(engine), SamplingParams(max_tokens=200, temperature=1.0, seed=i, guided=spec))
            for i in range(50)]
    results = run(engine, reqs)
    assert engine.pop_errors() == []
    assert len(results) == 50
    seen = set()
    for text, finish, _ in results.values():
        assert finish == STOP, text
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        seen.add(text)
    assert len(seen) > 40  # sampled, seeded differently: not one reply fifty times


def test_unconstrained_requests_keep_their_greedy_output_beside_constrained_ones(engine):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = [(f"alone{i}", prompt(engine, t), greedy) for i, t in enumerate(["Hi", "How are you?"])]
    alone = run(engine, plain)
    spec = GuidedSpec.json_schema(PERSON)
    mixed = run(engine, [(f"mixed{i}", ids, p) for i, (_, ids, p) in enumerate(plain)] + [
        ("c-greedy", prompt(engine), SamplingParams(max_tokens=200, temperature=0.0, guided=spec)),
        ("c-sampled", prompt(engine), SamplingParams(max_tokens=200, temperature=0.8, seed=1, guided=spec,
                                                     logprobs=2)),
    ])
    for i in range(2):
        assert mixed[(f"mixed{i}", 0)][2] == alone[(f"alone{i}", 0)][2]
    for rid in ("c-greedy", "c-sampled"):
        jsonschema.validate(json.loads(mixed[(rid, 0)][0]), PERSON)
    # and the greedy constrained reply is the same with or without company
    assert run(engine, [("c-alone", prompt(engine), SamplingParams(max_tokens=200, temperature=0.0, guided=spec))]
               )[("c-alone", 0)][2] == mixed[("c-greedy", 0)][2]


def test_n2_choices_each_follow_the_grammar(engine):
    spec = GuidedSpec.json_schema(PERSON)
    out = run(engine, [("n2", prompt(engine), SamplingParams(n=2, max_tokens=200, temperature=1.0, seed=7,
                                                             guided=spec))])
    texts = [out[("n2", i)][0] for i in range(2)]
    assert [out[("n2", i)][1] for i in range(2)] == [STOP, STOP]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert texts[0] != texts[1]


def test_max_tokens_cuts_with_length_and_a_prefix_of_valid_json(engine):
    spec = GuidedSpec.json_schema(PERSON)
    full = run(engine, [("full", prompt(engine), SamplingParams(max_tokens=200, temperature=0.0, guided=spec))])
    text, finish, tokens = full[("full", 0)]
    assert finish == STOP and len(tokens) > 6
    cut = run(engine, [("cut", prompt(engine), SamplingParams(max_tokens=5, temperature=0.0, guided=spec))])
    assert cut[("cut", 0)][1] == LENGTH and cut[("cut", 0)][2] == tokens[:5]


def test_json_object_with_leading_newline_and_ignore_eos_ends_with_stop(engine):
    # ignore_eos drops the model's stop ids, but a finished grammar has nothing left but them
    obj = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    spec = GuidedSpec.json_schema(obj, leading_newline=True)
    out = run(engine, [(f"e{i}", prompt(engine), SamplingParams(max_tokens=50, temperature=1.0, seed=i, guided=spec,
                                                                ignore_eos=True, min_tokens=40))
                       for i in range(6)])
    for text, finish, tokens in out.values():
        assert finish == STOP and tokens[-1] in engine.tokenizer.stop_token_ids
        assert json.loads(text.removeprefix("\n")) in ({"ok": True}, {"ok": False})
        assert not text.startswith("\n\n")


def test_tool_call_spec_gives_glm4_calls_with_valid_arguments(engine):
    spec = GuidedSpec.tool_call({"get_weather": WEATHER, "get_time": TIME})
    out = run(engine, [(f"t{i}", prompt(engine, "weather?"), SamplingParams(max_tokens=80, temperature=1.0, seed=i,
                                                                             guided=spec)) for i in range(12)])
    names = set()
    for text, finish, _ in out.values():
        assert finish == STOP
        name, newline, args = text.partition("\n")
        assert newline and name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(args), WEATHER if name == "get_weather" else TIME)
        names.add(name)
    assert names == {"get_weather", "get_time"}  # the model picks; neither is forced


def test_after_a_whole_call_the_separator_may_start_another_and_nowhere_else(engine):
    """tool_choice required: GLM-4's `<|assistant|>` between calls is allowed where the grammar could end, and
    starts the grammar over; mid-call, at a call's start, or in a spec without a separator it never is."""
    tok = engine.tokenizer
    sep, stops = tok.special_tokens["<|assistant|>"], frozenset(tok.stop_token_ids)

    def allowed(guide) -> torch.Tensor:
        logits = torch.zeros(1, tok.vocab_size)
        mask_logits(logits, [guide])
        return torch.isfinite(logits[0])  # [V]

    call = tok.encode('get_time\n{"tz": "UTC"}')
    guide = engine.grammars.guide(GuidedSpec.tool_call({"get_time": TIME}, call_separator=sep), stops)
    for k in range(2):
        if k:
            assert guide.advance(sep) is False  # the second call
        for t in call:
            assert not allowed(guide)[sep]
            assert guide.advance(t) is False
        after = allowed(guide)
        assert after[sep] and after[sorted(stops)].any()
    assert guide.advance(sep) is False and not allowed(guide)[sep]  # a third call, which must start with a name
    with pytest.raises(GuidedDecodingError):
        guide.advance(next(t for t in sorted(stops) if not allowed(guide)[t]))
    single = engine.grammars.guide(GuidedSpec.tool_call({"get_time": TIME}), stops)
    for t in call:
        single.advance(t)
    assert not allowed(single)[sep]
    assert single.advance(next(t for t in sorted(stops) if allowed(single)[t])) is True


def test_a_call_or_a_formatted_answer_gives_both_and_nothing_else(engine):
    """tool_choice auto with a response_format: each reply is a valid call or valid JSON of the format."""
    answer = GuidedSpec.json_schema(PERSON, leading_newline=True)
    spec = GuidedSpec.tool_call({"get_weather": WEATHER, "get_time": TIME}, otherwise=answer)
    out = run(engine, [(f"o{i}", prompt(engine, "weather?"), SamplingParams(max_tokens=200, temperature=1.5, seed=i,
                                                                             guided=spec)) for i in range(24)])
    kinds = set()
    for text, finish, _ in out.values():
        assert finish == STOP
        name, newline, args = text.partition("\n")
        if name in ("get_weather", "get_time"):
            jsonschema.validate(json.loads(args), WEATHER if name == "get_weather" else TIME)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(text.removeprefix("\n")), PERSON)
            kinds.add("answer")
    assert kinds == {"call", "answer"}


def test_preempted_constrained_sequences_recompute_and_stay_valid(make_checkpoint):
    spec = GuidedSpec.json_schema(PERSON)

    def replies(num_blocks):
        eng = build_llm_engine(EngineArgs(model=str(make_checkpoint()), dtype="float32", block_size=4,
                                          num_kv_blocks=num_blocks, max_model_len=200, max_num_seqs=8))
        reqs = [(f"q{i}", prompt(eng), SamplingParams(max_tokens=180, temperature=0.0 if i % 2 else 0.9, seed=i,
                                                      guided=spec)) for i in range(6)]
        return run(eng, reqs), eng.stats().num_preemptions_total

    roomy, _ = replies(600)
    tight, preemptions = replies(70)
    assert preemptions > 0
    assert {k: v[2] for k, v in tight.items()} == {k: v[2] for k, v in roomy.items()}
    for text, finish, _ in tight.values():
        assert finish == STOP
        jsonschema.validate(json.loads(text), PERSON)


class _RefusingMatcher:
    def fill_next_token_bitmask(self, bitmask, row):
        return False

    def accept_token(self, token_id):
        return False

    def is_terminated(self):
        return False


def test_a_grammar_failure_fails_only_its_request(engine):
    spec = GuidedSpec.json_schema(PERSON)
    engine.add_request("bad", prompt(engine), SamplingParams(max_tokens=50, temperature=0.0, guided=spec))
    (seq,) = engine.scheduler.seqs_of("bad")
    seq.guide = Guide(_RefusingMatcher(), engine.tokenizer.vocab_size)
    out = run(engine, [("good", prompt(engine), SamplingParams(max_tokens=200, temperature=0.0, guided=spec))])
    errors = engine.pop_errors()
    assert [rid for rid, _ in errors] == ["bad"] and "does not fit the grammar" in str(errors[0][1])
    jsonschema.validate(json.loads(out[("good", 0)][0]), PERSON)


def test_uncompilable_specs_are_refused_with_the_reason(engine):
    bad = [({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
           ({"$ref": "#/$defs/missing"}, "missing"),
           ({"type": "string", "pattern": "(?<=a)b"}, "Lookbehind")]
    for schema, reason in bad:
        with pytest.raises(GuidedSpecError, match="cannot compile") as e:
            engine.add_request("x", prompt(engine), SamplingParams(guided=GuidedSpec.json_schema(schema)))
        assert reason in str(e.value) and "/project/" not in str(e.value)
    assert not engine.has_request("x") and not engine.has_work


def test_compiled_grammars_are_cached_least_recently_used_first_within_a_memory_budget(engine):
    a, b, c = (GuidedSpec.json_schema({"enum": [k]}) for k in "abc")
    size = Grammars(engine.tokenizer).compile(a).memory_size_bytes
    grammars = Grammars(engine.tokenizer, cache_bytes=2 * size)  # two of these
    grammars.RECENT_S = 0  # none counts as just used
    first = grammars.compile(a)
    assert grammars.compile(GuidedSpec.json_schema({"enum": ["a"]})) is first  # equal spec, cached
    grammars.compile(b)
    grammars.compile(a)  # a is now the most recent
    grammars.compile(c)  # evicts b
    assert grammars.compile(a) is first
    assert list(grammars._cache) == [c, a]
    big = GuidedSpec.choice([f"choice number {i}" for i in range(300)])
    compiled = grammars.compile(big)
    assert compiled.memory_size_bytes > 2 * size  # over the budget alone: kept, the others pushed out
    assert list(grammars._cache) == [big] and grammars._cached_bytes == compiled.memory_size_bytes


def test_grammars_used_moments_ago_stay_up_to_twice_the_budget(engine):
    """The API compiles a request's grammar, then the engine adds the request and looks it up: evicted
    in between, it would be compiled again on the engine's thread, which every stream waits on."""
    a, b, c, d = (GuidedSpec.json_schema({"enum": [k]}) for k in "abcd")
    size = Grammars(engine.tokenizer).compile(a).memory_size_bytes
    grammars = Grammars(engine.tokenizer, cache_bytes=2 * size)
    for spec in (a, b, c, d):  # all just used: over the budget, within twice it
        grammars.compile(spec)
    assert list(grammars._cache) == [a, b, c, d]
    grammars.compile(GuidedSpec.json_schema({"enum": ["e"]}))  # past twice the budget: the least recent go
    assert len(grammars._cache) == 4 and a not in grammars._cache


def test_the_api_compiles_in_threads_of_its_own_and_not_at_all_when_cached(engine):
    import asyncio
    import threading

    grammars, threads = Grammars(engine.tokenizer), []
    compile_ = grammars.compile

    def recording(spec):
        threads.append(threading.current_thread().name)
        return compile_(spec)

    grammars.compile = recording
    spec = GuidedSpec.regex("[ab]+")
    asyncio.run(grammars.compile_async(spec))
    asyncio.run(grammars.compile_async(GuidedSpec.regex("[ab]+")))  # cached: no thread, no compile
    assert len(threads) == 1 and threads[0].startswith("grammar-compile")
    assert spec in grammars._cache


def test_grammar_vocab_hides_special_tokens_raw_control_bytes_and_ill_formed_utf8(engine):
    tok = engine.tokenizer
    vocab = grammar_vocab(tok)
    assert len(vocab) == tok.vocab_size
    for i, b in enumerate(vocab):
        raw = tok.token_bytes(i)
        if tok.is_special(i) or any(c < 0x20 and c != 0x0A for c in raw) or ill_formed_utf8(raw):
            assert b == b""
        else:
            assert b == raw
    assert vocab[tok.encode("\n")[0]] == b"\n" and vocab[tok.encode("\t")[0]] == b""
    assert b"\xff" in {tok.token_bytes(i) for i in range(tok.vocab_size)} and b"\xff" not in vocab


def test_utf8_checks():
    assert not ill_formed_utf8("é北😀".encode()) and not ill_formed_utf8(b"\xed\x9f") and not ill_formed_utf8(b"\xed")
    for bad in (b"\xed\xa0\x80", b"a\xe0\x9f", b"\xf0\x8f", b"\xf4\x90", b"\xc0", b"\xc1\xbf", b"\xf5", b"x\xff"):
        assert ill_formed_utf8(bad), bad
    assert utf8_tail(b"ab") == b"" and utf8_tail("北".encode()) == b"" and utf8_tail(b"a\xed") == b"\xed"
    assert utf8_tail(b"\xf0\x9f\x98") == b"\xf0\x9f\x98" and utf8_tail(b"\xf0\x9f\x98\x80") == b""
    assert utf8_tail(b"\x80\x80") == b""


def test_a_constrained_reply_cannot_spell_a_surrogate(engine):
    """After a lone ED lead byte xgrammar allows any continuation byte; ED A0..BF starts a surrogate,
    which no UTF-8 decoder takes (the text would show U+FFFD and break maxLength): masked."""
    tok = engine.tokenizer
    byte_token = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    guide = engine.grammars.guide(GuidedSpec.json_schema(TIME), frozenset(tok.stop_token_ids))
    for t in tok.encode('{"tz": "') + [byte_token[b"\xed"]]:
        guide.advance(t)
    logits = torch.zeros(1, tok.vocab_size)
    mask_logits(logits, [guide])
    allowed = set((logits[0] > -torch.inf).nonzero().flatten().tolist())
    assert byte_token[b"\x9f"] in allowed and byte_token[b"\x80"] in allowed
    assert byte_token[b"\xa0"] not in allowed and byte_token[b"\xbf"] not in allowed
    assert not any(0xA0 <= tok.token_bytes(t)[0] <= 0xBF for t in allowed if tok.token_bytes(t))
    guide.advance(byte_token[b"\x9f"])  # U+D7C0's first two bytes: no lone lead byte is left
    assert guide.utf8_allowed() is None


def test_sampler_masks_only_constrained_rows_and_reports_logprobs_before_the_mask(engine):
    tok = engine.tokenizer
    guide = engine.grammars.guide(GuidedSpec.json_schema({"enum": ["yes"]}), frozenset(tok.stop_token_ids))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, tok.vocab_size, generator=g)
    quote = tok.encode('"')[0]
    logits[1, quote] = -30.0  # the only grammatical token is the model's least favourite
    before = logits.clone()
    rows = [SampleRow(SamplingParams(temperature=0.0, logprobs=1), [1], [], None, frozenset(), None),
            SampleRow(SamplingParams(temperature=0.0, logprobs=1), [1], [], None, frozenset(), guide)]
    free, constrained = Sampler()(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are never written
    assert free.token_id == int(before[0].argmax())
    assert tok.decode([constrained.token_id]).startswith('"')
    logprobs = before[1].log_softmax(-1)
    assert constrained.logprob.logprob == pytest.approx(float(logprobs[constrained.token_id]), abs=1e-5)
    assert constrained.logprob.top[0][0] == int(before[1].argmax())  # a forbidden, likelier token


def test_sampled_rows_beside_a_constrained_one_draw_what_they_draw_alone(engine):
    tok = engine.tokenizer
    spec = GuidedSpec.json_schema({"enum": ["yes", "no"]})
    logits = torch.randn(3, tok.vocab_size, generator=torch.Generator().manual_seed(1))

    def row(seed, guide=None, temperature=0.9):
        return SampleRow(SamplingParams(temperature=temperature, seed=seed, top_k=50), [1], [],
                         make_generator(seed, 0), frozenset(), guide)

    alone = [Sampler()(logits[i : i + 1], [row(i)])[0].token_id for i in (0, 2)]
    for greedy_middle in (False, True):
        guide = engine.grammars.guide(spec, frozenset(tok.stop_token_ids))
        together = Sampler()(logits, [row(0), row(1, guide, 0.0 if greedy_middle else 0.9), row(2)])
        assert [together[0].token_id, together[2].token_id] == alone
        assert tok.decode([together[1].token_id]).startswith('"')


def test_mask_logits_matches_xgrammars_kernel_and_cuts_padding_ids(engine):
    import xgrammar as xgr

    tok = engine.tokenizer
    spec = GuidedSpec.json_schema(PERSON)
    guides = [engine.grammars.guide(spec, frozenset(tok.stop_token_ids)) for _ in range(3)]
    texts = ['{"name": "a', '{"name": "ab", "age": 1',
             '{"name": "x", "age": 7, "role": "user", "address": {"city": "Paris", "zip": "12345"}}']
    for g, text in zip(guides, texts):
        for t in tok.encode(text):
            g.advance(t)
    logits = torch.randn(3, tok.vocab_size + 7, generator=torch.Generator().manual_seed(0))
    ours = logits.clone()
    mask_logits(ours, guides)
    assert torch.isinf(ours[:, tok.vocab_size:]).all()
    bitmask = xgr.allocate_token_bitmask(3, tok.vocab_size)
    for j, g in enumerate(guides):
        g._matcher.fill_next_token_bitmask(bitmask, j)
    reference = logits[:, : tok.vocab_size].clone()
    xgr.apply_token_bitmask_inplace(reference, bitmask)
    assert torch.equal(ours[:, : tok.vocab_size], reference)
    allowed = [set((row > -torch.inf).nonzero().flatten().tolist()) for row in ours]
    assert tok.vocab_size // 2 < len(allowed[0]) < tok.vocab_size  # inside a string: most tokens, not all
    assert allowed[2] == set(tok.stop_token_ids)  # complete: only the stop tokens


def test_requests_without_a_constraint_never_load_the_grammar_engine():
    script = """
import sys
sys.path.insert(0, "tests")
from engine_fakes import FakeRunner, FakeTokenizer, VOCAB, sched_config
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.engine.block_pool import BlockPool

engine = LLMEngine(FakeRunner(64, 4), FakeTokenizer(), sched_config(block_size=4, max_model_len=128),
                   BlockPool(64, 4), (1, 2, 3), vocab_size=VOCAB)
for i, params in enumerate([SamplingParams(max_tokens=5, temperature=0.0),
                            SamplingParams(max_tokens=5, temperature=0.7, seed=1, logprobs=2, n=2)]):
    engine.add_request(f"r{i}", [11, 12, 13], params)
while engine.has_work:
    engine.step()
print("xgrammar" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_real_glm4_tokenizer_tool_call_and_json_reply(real_chat_dir):
    from glm4serve.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(real_chat_dir)
    grammars = Grammars(tok)
    stops = frozenset(tok.stop_token_ids)
    observation = tok.special_tokens["<|observation|>"]
    call = GuidedSpec.tool_call({"get_weather": WEATHER, "get_time": TIME})
    guide = grammars.guide(call, stops)
    ids = tok.encode('get_time\n{"tz": "北京时间"}', allow_special=False)
    assert [guide.advance(t) for t in ids] == [False] * len(ids)
    assert guide.advance(observation) is True
    # a plain chat reply's "\n" is allowed once before the JSON, not twice
    reply = GuidedSpec.json_schema(WEATHER, leading_newline=True)
    guide = grammars.guide(reply, stops)
    for t in tok.encode('\n{"city": "Rome"}', allow_special=False):
        guide.advance(t)
    assert guide.advance(observation) is True
    guide = grammars.guide(reply, stops)
    guide.advance(tok.encode("\n")[0])
    with pytest.raises(GuidedDecodingError):
        guide.advance(tok.encode("\n")[0])
    # the special tokens that are not stops never fit, even where their text would
    guide = grammars.guide(GuidedSpec.json_schema({"type": "string"}), stops)
    guide.advance(tok.encode('"')[0])
    with pytest.raises(GuidedDecodingError):
        guide.advance(tok.special_tokens["<|assistant|>"])


def test_stop_strings_and_the_requests_own_stop_ids_apply_to_constrained_replies(engine):
    tok = engine.tokenizer
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                                   "required": ["answer"]})
    out = run(engine, [("s", prompt(engine), SamplingParams(max_tokens=50, temperature=0.0, guided=spec,
                                                            stop=['"answer"']))])
    assert out[("s", 0)][:2] == ("{", STOP)
    # with ignore_eos the request's explicit stop id is the only way out of the finished grammar
    user = tok.special_tokens["<|user|>"]
    out = run(engine, [(f"i{k}", prompt(engine), SamplingParams(max_tokens=50, temperature=1.0, seed=k, guided=spec,
                                                                ignore_eos=True, stop_token_ids=[user]))
                       for k in range(4)])
    for text, finish, tokens in out.values():
        assert finish == STOP and tokens[-1] == user
        assert json.loads(text) in ({"answer": "yes"}, {"answer": "no"})


def test_stop_ids_that_are_text_stay_in_the_grammar_and_stop_the_reply(engine):
    # Every token that can open a JSON object made a stop id: kept out of the grammar they would
    # leave it nothing to open with; as text they stop the reply where the grammar writes one.
    tok = engine.tokenizer
    opening = [i for i in range(tok.vocab_size) if not tok.is_special(i) and tok.token_bytes(i).lstrip()[:1] == b"{"]
    assert opening
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=k, guided=GuidedSpec.json_object(),
                             stop_token_ids=opening, ignore_eos=ignore_eos)
              for k in range(3) for ignore_eos in (False, True)]
    out = run(engine, [(f"r{k}", prompt(engine), p) for k, p in enumerate(params)])
    assert engine.pop_errors() == []
    for text, finish, tokens in out.values():
        assert finish == STOP and tokens[-1] in opening and text.strip() == ""


ARITHMETIC = 'root ::= term (" " op " " term){0,3}\nterm ::= [1-9] [0-9]{0,2}\nop ::= "+" | "-" | "*"'


@pytest.mark.parametrize("spec,check", [
    (GuidedSpec.regex(r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}"),
     lambda t: re.fullmatch(r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}", t)),
    (GuidedSpec.choice(["positive", "negative", "中性 \"neutral\""]),
     lambda t: t in ("positive", "negative", "中性 \"neutral\"")),
    (GuidedSpec.grammar(ARITHMETIC), lambda t: re.fullmatch(r"[1-9][0-9]{0,2}( [-+*] [1-9][0-9]{0,2}){0,3}", t)),
    (GuidedSpec.regex(r"(yes|no)!", leading_newline=True), lambda t: re.fullmatch(r"\n?(yes|no)!", t)),
], ids=["regex", "choice", "grammar", "regex-after-newline"])
def test_vllm_regex_choice_and_grammar_constraints_hold_for_sampled_replies(engine, spec, check):
    out = run(engine, [(f"s{i}", prompt(engine), SamplingParams(max_tokens=40, temperature=1.0, seed=i, guided=spec))
                       for i in range(16)])
    assert engine.pop_errors() == []
    texts = [text for text, finish, _ in out.values() if finish == STOP]
    assert len(texts) == 16 and all(check(t) for t in texts), texts
    assert len(set(texts)) > 1  # the model picks among what the constraint allows


def test_uncompilable_regex_and_grammar_are_refused_with_the_reason(engine):
    for spec, reason in ((GuidedSpec.regex("(ab"), "cannot compile this regex"),
                         (GuidedSpec.grammar("root ::= "), "cannot compile this grammar")):
        with pytest.raises(GuidedSpecError, match=reason):
            engine.add_request("x", prompt(engine), SamplingParams(guided=spec))
    with pytest.raises(GuidedSpecError):
        GuidedSpec.choice(["a", ""])
    assert not engine.has_work


def test_a_pattern_that_opens_with_a_newline_keeps_it_after_glm4s_own(engine):
    """In chat GLM-4's "\\n" comes first and the API strips it: before a pattern the grammar requires
    it, so the one stripped is never the pattern's own."""
    spec = GuidedSpec.regex(r"\n[a-z]{3}", leading_newline=True)
    out = run(engine, [(f"n{i}", prompt(engine), SamplingParams(max_tokens=10, temperature=1.0, seed=i, guided=spec))
                       for i in range(8)])
    assert all(re.fullmatch(r"\n\n[a-z]{3}", text) and finish == STOP for text, finish, _ in out.values())


def test_a_constraint_only_control_characters_satisfy_is_refused_or_fails_only_its_request(engine, caplog):
    for spec in (GuidedSpec.choice(["\t"]), GuidedSpec.regex(r"\x00"), GuidedSpec.grammar('root ::= root "a"'),
                 GuidedSpec.choice(["\t"], leading_newline=True), GuidedSpec.regex(r"\x01", leading_newline=True)):
        with pytest.raises(GuidedSpecError, match="no reply can follow"):  # in chat, after GLM-4's newline
            engine.add_request("x", prompt(engine), SamplingParams(guided=spec))
    # "a" may start it, then only a control character goes on; a surrogate's first byte may start it, then
    # only its ill-formed second byte (xgrammar's grammar takes it; UTF-8 not): each request fails, with the
    # reason, before the sampler draws from nothing, and the log has no traceback for a request's own constraint
    with caplog.at_level(logging.INFO, logger="glm4serve"):
        out = run(engine, [
            ("stuck", prompt(engine), SamplingParams(max_tokens=8, guided=GuidedSpec.choice(["a\x01b"]))),
            ("surrogate", prompt(engine),
             SamplingParams(max_tokens=8, guided=GuidedSpec.grammar('root ::= "\\ud800"'))),
            ("fine", prompt(engine), SamplingParams(max_tokens=8, guided=GuidedSpec.choice(["ab"])))])
    errors = dict(engine.pop_errors())
    assert sorted(errors) == ["stuck", "surrogate"], errors
    assert all(isinstance(e, ConstraintError) and "allows no token here" in str(e) for e in errors.values()), errors
    assert out[("fine", 0)][:2] == ("ab", STOP)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_a_grammar_and_allowed_token_ids_with_nothing_in_common_fail_only_their_request_without_a_traceback(
        engine, caplog):
    """Each leaves some token, together none: a ConstraintError naming both, not a token the grammar
    refuses after the fact, and a warning in the log rather than a server fault's traceback."""
    tok = engine.tokenizer
    digit = tok.encode("7")
    for temperature in (0.0, 1.0):
        with caplog.at_level(logging.INFO, logger="glm4serve"):
            out = run(engine, [
                ("both", prompt(engine), SamplingParams(max_tokens=4, temperature=temperature, seed=1,
                                                        allowed_token_ids=digit, guided=GuidedSpec.json_object())),
                ("fine", prompt(engine), SamplingParams(max_tokens=4, temperature=temperature, seed=1,
                                                        guided=GuidedSpec.regex("[0-9]+")))])
        [(rid, error)] = engine.pop_errors()
        assert rid == "both" and isinstance(error, ConstraintError)
        assert "fits both the constraint and allowed_token_ids" in str(error)
        assert re.fullmatch("[0-9]+", out[("fine", 0)][0])
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
        caplog.clear()
