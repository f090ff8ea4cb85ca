"""GLM-4 tool-call parsing, whole replies and streamed."""

import json
import random
import re

import pytest

from glm4serve.chat.tool_parser import (
    CALL_MARK,
    ContentDelta,
    StreamingToolParser,
    ToolArgsDelta,
    ToolCallStart,
    new_call_id,
    opening_call,
    parse_reply,
)

NAMES = {"get_weather", "get_time", "search"}
SEP = CALL_MARK  # the <|assistant|> token between calls, as the detokenizer writes it for the parser


def calls_of(text, names=NAMES, **flags):
    """The calls of a whole reply as (name, arguments), or None when it is plain text (then its
    content is the text, separators taken out)."""
    calls, content = parse_reply(text, names, **flags)
    if not calls:
        assert content == text.replace(SEP, "")
        return None
    return [(c.name, c.arguments) for c in calls]


def stream(text, names, chunks, truncated=False, lenient=False, one_call=False):
    """Feed `text` split at `chunks` sizes; check the event invariants and reassemble the events
    into (content, [(name, arguments)])."""
    parser = StreamingToolParser(names, lenient=lenient, one_call=one_call)
    events, pos = [], 0
    for size in chunks:
        events += parser.feed(text[pos : pos + size])
        pos += size
    assert pos >= len(text)
    events += parser.finish(truncated=truncated)

    content, calls, ids = "", [], []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content += event.text
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls), "calls are started once each, in order"
            calls.append([event.name, ""])
            ids.append(event.id)
        else:
            assert isinstance(event, ToolArgsDelta)
            assert event.text and event.index == len(calls) - 1, "arguments only for the current call"
            calls[-1][1] += event.text
    assert len(set(ids)) == len(ids)
    assert [(c.id, c.name, c.arguments) for c in parser.calls] == [(i, n, a) for i, (n, a) in zip(ids, calls)]
    return content, [tuple(c) for c in calls]


def one_char_chunks(text):
    return [1] * len(text)


def random_chunks(text, seed):
    rng = random.Random(seed)
    sizes, left = [], len(text)
    while left > 0:
        sizes.append(min(left, rng.randint(1, 9)))
        left -= sizes[-1]
    return sizes


# (reply text, truncated, expected calls or None for plain text); the expected values are
# written by hand, and the streaming parser must agree with the whole-reply parser on each.
CASES = {
    "single": ('get_weather\n{"city": "Paris"}', False, [("get_weather", '{"city": "Paris"}')]),
    "two_calls": (
        'get_weather\n{"city": "Paris"}' + SEP + 'get_time\n{"tz": "Europe/Paris"}',
        False,
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')],
    ),
    "chinese": ('get_weather\n{"city": "北京", "单位": "摄氏度"}', False, [("get_weather", '{"city": "北京", "单位": "摄氏度"}')]),
    "nested": (
        'search\n{"q": "a<b <|assist", "filter": {"tags": ["x", {"y": null}], "n": [1, 2.5]}}',
        False,
        [("search", '{"q": "a<b <|assist", "filter": {"tags": ["x", {"y": null}], "n": [1, 2.5]}}')],
    ),
    "pretty_printed_with_whitespace": (
        'search\n  \n{\n    "q": "glm",\n    "k": 3\n}\n\n ' + SEP + "get_time\n{}\n",
        False,
        [("search", '{\n    "q": "glm",\n    "k": 3\n}'), ("get_time", "{}")],
    ),
    "trailing_separator": ('get_time\n{"tz": "UTC"}' + SEP, False, [("get_time", '{"tz": "UTC"}')]),
    "truncated_call": ('get_weather\n{"city": "Pa', True, [("get_weather", '{"city": "Pa')]),
    "truncated_second_call": (
        'get_time\n{}' + SEP + 'search\n{"q": "lo',
        True,
        [("get_time", "{}"), ("search", '{"q": "lo')],
    ),
    "truncated_in_second_name": ('get_time\n{}' + SEP + "get_wea", True, [("get_time", "{}")]),
    "truncated_before_args": ("get_weather\n", True, [("get_weather", "")]),
    "plain": ("Hello there!", False, None),
    "glm_plain_reply": ("\nThe weather in 北京 is sunny.", False, None),
    "prose_mentioning_tool": ("get_weather is the tool I would use.\n{}", False, None),
    "tool_name_later_in_first_line": ('I will call get_weather\n{"city": "Paris"}', False, None),
    "name_prefix_then_prose": ("get the forecast first", False, None),
    "plain_with_separator_text": ("\nHi" + SEP + "there", False, None),
    "crlf_is_not_a_name_line": ('get_time\r\n{"tz": "UTC"}', False, None),
    "name_only": ("get_time", False, None),
    "name_only_truncated": ("get_ti", True, None),
    "empty": ("", False, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_reply(name):
    text, truncated, expected = CASES[name]
    assert calls_of(text, truncated=truncated) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_agrees_with_whole_reply(name):
    text, truncated, expected = CASES[name]
    for chunks in [one_char_chunks(text), [len(text)]] + [random_chunks(text, seed) for seed in range(20)]:
        content, calls = stream(text, NAMES, chunks, truncated)
        if expected is None:
            assert (content, calls) == (text.replace(SEP, ""), [])  # plain text passes through
        else:
            assert (content, calls) == ("", expected)


ONE_CALL_CASES = {  # parallel_tool_calls false: (reply, truncated) -> the calls, or None for plain text
    "two_calls": ('get_time\n{"tz": "UTC"}' + SEP + 'search\n{"q": "x"}', False, [("get_time", '{"tz": "UTC"}')]),
    "a_call_then_text": ("get_time\n{}" + SEP + "\nsome text", False, [("get_time", "{}")]),
    "a_call_then_a_bad_call": ("get_time\n{}" + SEP + "search\n{oops", False, [("get_time", "{}")]),
    "a_second_call_cut": ("get_time\n{}" + SEP + 'search\n{"q": "lo', True, [("get_time", "{}")]),
    "a_call_alone_cut": ('search\n{"q": "lo', True, [("search", '{"q": "lo')]),
    "text_then_a_call": ("\nLet me see." + SEP + "get_time\n{}", False, None),
    "a_bad_call_then_a_call": ("get_time\n{oops" + SEP + "get_time\n{}", False, None),
}


@pytest.mark.parametrize("name", sorted(ONE_CALL_CASES))
def test_one_call_keeps_an_opening_whole_call_alone_streamed_as_whole(name):
    text, truncated, want = ONE_CALL_CASES[name]
    whole = opening_call(text, NAMES) or parse_reply(text, NAMES, truncated=truncated)[0]
    assert ([(c.name, c.arguments) for c in whole] or None) == want
    for chunks in [one_char_chunks(text), [len(text)]] + [random_chunks(text, seed) for seed in range(20)]:
        content, calls = stream(text, NAMES, chunks, truncated, one_call=True)
        assert (content, calls) == ((text.replace(SEP, ""), []) if want is None else ("", want))


def test_one_call_stops_a_forced_replys_streamed_calls_at_the_first():
    text = 'get_time\n{"tz": "UTC"}' + SEP + 'search\n{"q": "x"}'
    for chunks in [one_char_chunks(text), [len(text)]] + [random_chunks(text, seed) for seed in range(20)]:
        assert stream(text, NAMES, chunks, lenient=True, one_call=True) == ("", [("get_time", '{"tz": "UTC"}')])


def test_call_ids():
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    calls, _ = parse_reply(CASES["two_calls"][0], NAMES)
    assert calls[0].id != calls[1].id and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)


def test_arguments_are_valid_json_as_written():
    calls, _ = parse_reply(CASES["chinese"][0], NAMES)
    assert json.loads(calls[0].arguments) == {"city": "北京", "单位": "摄氏度"}


@pytest.mark.parametrize(
    "text",
    [
        "get_weather\nis what I would call.",  # first line is a tool name, the rest is prose
        'get_weather\n{"city": "Paris"',  # incomplete JSON, not truncated
        "get_weather\n[1, 2]",  # JSON, but not an object
        'get_time\n{}' + SEP + "\nDone.",  # a later segment that is not a call
        'get_time\n{}' + SEP + 'get_weather\n{"city": oops}',  # a later call with bad JSON
        'get_time\n{}' + SEP + SEP + "get_time\n{}",  # an empty segment in between
        "unknown_tool\n{}",
    ],
)
def test_reply_is_strict(text):
    assert calls_of(text) is None
    assert stream(text, NAMES, one_char_chunks(text)) == (text.replace(SEP, ""), [])


def test_no_tool_names_means_plain_text():
    text = 'get_time\n{"tz": "UTC"}'
    assert calls_of(text, set()) is None
    parser = StreamingToolParser(set())
    assert parser.feed("g") == [ContentDelta("g")]


# --- streaming: decide as early as the text allows ---


def test_plain_text_is_not_held_back():
    parser = StreamingToolParser({"get_weather"})
    assert parser.feed("H") == [ContentDelta("H")]  # no tool name starts with "H"
    assert parser.feed("ello") == [ContentDelta("ello")]
    assert parser.finish() == []


def test_glm_plain_reply_flushes_on_the_leading_newline():
    parser = StreamingToolParser({"get_weather"})
    assert parser.feed("\n") == [ContentDelta("\n")]


def test_possible_tool_name_is_held_until_it_cannot_be_one():
    parser = StreamingToolParser({"get_weather", "get_time"})
    assert parser.feed("g") == []
    assert parser.feed("et_") == []
    assert parser.feed("weather") == []  # a complete name, but the line is not over
    assert parser.feed(" is nice") == [ContentDelta("get_weather is nice")]
    assert parser.feed("\nget_time\n{}") == [ContentDelta("\nget_time\n{}")]
    assert parser.finish() == []
    assert parser.calls == []


def test_tool_call_is_held_to_the_end_then_sent_whole():
    parser = StreamingToolParser({"get_weather"})
    for piece in ["get_weather", "\n", '{"city": ', '"北京"}', SEP, "get_weather\n{}"]:
        assert parser.feed(piece) == []
    start0, args0, start1, args1 = parser.finish()
    assert (start0.index, start0.name, args0) == (0, "get_weather", ToolArgsDelta(0, '{"city": "北京"}'))
    assert (start1.index, start1.name, args1) == (1, "get_weather", ToolArgsDelta(1, "{}"))
    assert start0.id != start1.id
    assert [(c.id, c.name, c.arguments) for c in parser.calls] == [
        (start0.id, "get_weather", '{"city": "北京"}'), (start1.id, "get_weather", "{}")]


def test_special_token_text_is_ordinary_text():
    # "<|assistant|>" written by the model as text is not the separator token: it stays in the
    # arguments, and in plain text
    text = 'search\n{"q": "what is <|assistant|>?"}'
    assert calls_of(text) == [("search", '{"q": "what is <|assistant|>?"}')]
    assert calls_of("\nType <|assistant|> or <|user|>") is None
    assert stream(text, NAMES, one_char_chunks(text)) == ("", [("search", '{"q": "what is <|assistant|>?"}')])


def test_overlapping_tool_names():
    names = {"get", "get_weather"}
    for text, expected in [("get\n{}", [("get", "{}")]), ("get_weather\n{}", [("get_weather", "{}")])]:
        assert calls_of(text, names) == expected
        assert stream(text, names, one_char_chunks(text)) == ("", expected)


def test_truncated_flag_only_matters_at_the_end():
    text = 'get_weather\n{"city": "Pa'
    assert calls_of(text) is None
    assert calls_of(text, truncated=True) == [("get_weather", '{"city": "Pa')]
    # not truncated: a cut-off second name makes the reply text; truncated: it is dropped
    text = "get_time\n{}" + SEP + "get_wea"
    assert stream(text, NAMES, one_char_chunks(text), truncated=False) == ("get_time\n{}get_wea", [])
    assert stream(text, NAMES, one_char_chunks(text), truncated=True) == ("", [("get_time", "{}")])


# --- lenient (a forced tool_choice): a grammar wrote the call ---


@pytest.mark.parametrize("text, expected", [
    ('get_time\n{"tz": "', ("", [("get_time", '{"tz": "')])),  # a stop string cut the JSON
    ("get_weather\nis what I would call.", ("", [("get_weather", "is what I would call.")])),
    ('get_time\n{"tz": "UTC"}' + SEP + "\nDone.", ("\nDone.", [("get_time", '{"tz": "UTC"}')])),
    ("get_time\n{}" + SEP + "get_wea", ("get_wea", [("get_time", "{}")])),
    ("Hello", ("Hello", [])),
])
def test_lenient_keeps_calls_whatever_their_arguments(text, expected):
    calls, content = parse_reply(text, NAMES, lenient=True)
    assert (content, [(c.name, c.arguments) for c in calls]) == expected
    for chunks in [one_char_chunks(text), [len(text)]]:
        assert stream(text, NAMES, chunks, lenient=True) == expected


@pytest.mark.parametrize("text", ["get_wea", "g", "get_time"])
def test_a_forced_reply_cut_in_its_first_name_is_neither_call_nor_content(text):
    assert parse_reply(text, NAMES, truncated=True, lenient=True) == ([], "")
    for chunks in [one_char_chunks(text), [len(text)]]:
        assert stream(text, NAMES, chunks, truncated=True, lenient=True) == ("", [])
    assert parse_reply(text, NAMES, truncated=True) == ([], text)  # not forced: it may have been prose


def test_feed_after_finish_is_an_error():
    parser = StreamingToolParser(NAMES)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_a_freeform_tools_call_takes_its_rest_as_written():
    """The Responses API's custom tools: any text after the name line is the call's input, whole or streamed."""
    reply = "apply_patch\n*** Begin Patch\n*** End Patch"
    calls, content = parse_reply(reply, {"apply_patch", "f"}, freeform=frozenset({"apply_patch"}))
    assert [(c.name, c.arguments) for c in calls] == [("apply_patch", "*** Begin Patch\n*** End Patch")]
    assert content == ""
    assert parse_reply(reply, {"apply_patch"})[0] == []  # not freeform: text that is no JSON is content
    parser = StreamingToolParser({"apply_patch"}, freeform=frozenset({"apply_patch"}))
    events = [e for piece in (reply[:5], reply[5:20], reply[20:]) for e in parser.feed(piece)] + parser.finish()
    assert [type(e).__name__ for e in events] == ["ToolCallStart", "ToolArgsDelta"]
    assert events[1].text == "*** Begin Patch\n*** End Patch"


def test_a_forced_call_starts_at_once_and_its_arguments_stream_as_they_come():
    """lenient (a grammar wrote it): the first call is sure once its name line is, so nothing waits for the end."""
    parser = StreamingToolParser(NAMES, lenient=True)
    assert parser.feed("get_we") == []
    [start] = parser.feed("ather\n")
    assert isinstance(start, ToolCallStart) and start.name == "get_weather"
    sent = [e.text for piece in (' {"city"', ': "Par', 'is"} ', "\n") for e in parser.feed(piece)]
    assert sent == ['{"city"', ': "Par', 'is"}']  # whitespace at the ends held back, as the whole reply strips it
    assert parser.finish() == []
    assert [(c.id, c.name, c.arguments) for c in parser.calls] == [(start.id, "get_weather", '{"city": "Paris"}')]
    not_forced = StreamingToolParser(NAMES)
    assert [e for piece in ("get_weather\n", '{"city": "Paris"}') for e in not_forced.feed(piece)] == []


def test_each_forced_call_starts_at_its_name_line_and_streams_its_arguments():
    """tool_choice required may make several calls (a grammar writes each): the second one streams too."""
    parser = StreamingToolParser(NAMES, lenient=True)
    pieces = ["get_time\n{}", SEP + "get_wea", "ther\n", ' {"city"', ': "Rome"} ']
    events = [[(type(e).__name__, getattr(e, "name", None) or getattr(e, "text", None)) for e in parser.feed(p)]
              for p in pieces]
    assert events == [[("ToolCallStart", "get_time"), ("ToolArgsDelta", "{}")], [], [("ToolCallStart", "get_weather")],
                      [("ToolArgsDelta", '{"city"')], [("ToolArgsDelta", ': "Rome"}')]]
    assert parser.finish() == []
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]
