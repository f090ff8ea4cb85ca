"""GLM-4 tool-call parsing, whole replies and streamed."""

import json
import random
import re

import pytest

from glm4serve.chat.tool_parser import (
    ContentDelta,
    StreamingToolParser,
    ToolArgsDelta,
    ToolCallStart,
    new_call_id,
    parse_tool_calls,
)

NAMES = {"get_weather", "get_time", "search"}
SEP = "<|assistant|>"


def calls_of(result):
    return None if result is None else [(c.name, c.arguments) for c in result]


def stream(text, names, chunks, truncated=False):
    """Feed `text` split at `chunks` sizes; check the event invariants and reassemble the events
    into (content, [(name, arguments)])."""
    parser = StreamingToolParser(names)
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
def test_parse_tool_calls(name):
    text, truncated, expected = CASES[name]
    assert calls_of(parse_tool_calls(text, NAMES, truncated=truncated)) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_agrees_with_whole_reply(name):
    text, truncated, expected = CASES[name]
    for chunks in [one_char_chunks(text), [len(text)]] + [random_chunks(text, seed) for seed in range(20)]:
        content, calls = stream(text, NAMES, chunks, truncated)
        if expected is None:
            assert (content, calls) == (text, [])  # plain text passes through verbatim
        else:
            assert (content, calls) == ("", expected)


def test_call_ids():
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    calls = parse_tool_calls(CASES["two_calls"][0], NAMES)
    assert calls[0].id != calls[1].id and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)


def test_arguments_are_valid_json_as_written():
    calls = parse_tool_calls(CASES["chinese"][0], NAMES)
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
def test_whole_reply_is_strict(text):
    assert parse_tool_calls(text, NAMES) is None


def test_no_tool_names_means_plain_text():
    text = 'get_time\n{"tz": "UTC"}'
    assert parse_tool_calls(text, set()) is None
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


def test_tool_call_starts_at_the_newline_and_streams_arguments():
    parser = StreamingToolParser({"get_weather"})
    assert parser.feed("get_weather") == []
    (start,) = parser.feed("\n")
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "get_weather")
    assert parser.feed('{"city": ') == [ToolArgsDelta(0, '{"city":')]  # trailing space held
    assert parser.feed('"北京"}') == [ToolArgsDelta(0, ' "北京"}')]
    assert parser.feed("<|assi") == []  # could be the separator
    events = parser.feed("stant|>get_weather\n{}")
    assert [type(e) for e in events] == [ToolCallStart, ToolArgsDelta]
    assert events[0].index == 1 and events[0].id != start.id and events[1] == ToolArgsDelta(1, "{}")
    assert parser.finish() == []
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "北京"}'), ("get_weather", "{}")]


def test_held_back_separator_prefix_is_released_when_it_is_not_one():
    parser = StreamingToolParser({"search"})
    parser.feed("search\n")
    assert parser.feed('{"q": "<|as') == [ToolArgsDelta(0, '{"q": "')]
    assert parser.feed('k"}') == [ToolArgsDelta(0, '<|ask"}')]


def test_overlapping_tool_names():
    names = {"get", "get_weather"}
    for text, expected in [("get\n{}", [("get", "{}")]), ("get_weather\n{}", [("get_weather", "{}")])]:
        assert calls_of(parse_tool_calls(text, names)) == expected
        assert stream(text, names, one_char_chunks(text)) == ("", expected)


# --- streaming: documented differences from the whole-reply parser ---


def test_streamed_call_with_invalid_json_stays_a_call():
    # Already announced as a call, so it cannot become content; the whole-reply parser says text.
    text = "get_weather\nis what I would call."
    assert parse_tool_calls(text, NAMES) is None
    assert stream(text, NAMES, one_char_chunks(text)) == ("", [("get_weather", "is what I would call.")])


def test_streamed_plain_segment_after_a_call_is_content():
    text = 'get_time\n{"tz": "UTC"}' + SEP + "\nDone."
    assert parse_tool_calls(text, NAMES) is None
    assert stream(text, NAMES, one_char_chunks(text)) == ("\nDone.", [("get_time", '{"tz": "UTC"}')])


def test_truncated_flag_only_matters_at_the_end():
    text = 'get_weather\n{"city": "Pa'
    assert parse_tool_calls(text, NAMES) is None
    assert calls_of(parse_tool_calls(text, NAMES, truncated=True)) == [("get_weather", '{"city": "Pa')]
    # not truncated: a cut-off second name is text after the calls, truncated: dropped
    text = "get_time\n{}" + SEP + "get_wea"
    assert stream(text, NAMES, one_char_chunks(text), truncated=False) == ("get_wea", [("get_time", "{}")])
    assert stream(text, NAMES, one_char_chunks(text), truncated=True) == ("", [("get_time", "{}")])


def test_feed_after_finish_is_an_error():
    parser = StreamingToolParser(NAMES)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
