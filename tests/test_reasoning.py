"""The thinking of a reasoning model (GLM-Z1) split from its answer: whole replies, and the same
split over any chunking of a streamed one."""

from __future__ import annotations

import random

import pytest

from glm4serve.chat.reasoning import StreamingReasoningParser, split_reasoning


@pytest.mark.parametrize("reply,split", [
    ("Let me see.</think>The answer is 4.", ("Let me see.", "The answer is 4.")),
    ("<think>Hmm.</think>\nYes.", ("Hmm.", "\nYes.")),  # a model that opens the tag itself
    ("</think>Straight away.", ("", "Straight away.")),
    ("Still thinking when cut", ("Still thinking when cut", None)),
    ("a</think>b</think>c", ("a", "b</think>c")),  # the first end closes the thinking
    ("x <think> y</think>z", ("x <think> y", "z")),  # only a reply's opening tag is dropped
    ("", ("", None)),
])
def test_split_reasoning(reply, split):
    assert split_reasoning(reply) == split


REPLIES = ["Let me see.</think>The answer is 4.", "<think>Hmm, <thin</think>\nYes.</think>",
           "thinking </th and more</think>", "<thi", "<think>", "no end </think", "</think>", "a<b</c</think>d<"]


@pytest.mark.parametrize("reply", REPLIES)
def test_any_chunking_of_a_stream_gives_the_whole_replys_split(reply):
    rng = random.Random(reply)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(reply)), k=rng.randint(0, len(reply) - 1)))
        pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
        parser = StreamingReasoningParser()
        thinking, answer = "", ""
        for piece in pieces:
            t, a = parser.feed(piece)
            assert not t or not answer, "thinking after the answer began"
            thinking, answer = thinking + t, answer + a
        thinking += parser.finish()
        whole_thinking, whole_answer = split_reasoning(reply)
        assert (thinking, answer) == (whole_thinking, whole_answer or ""), pieces
        assert parser.thinking == (whole_answer is None)


@pytest.mark.parametrize("tokens, thinking", [
    ([b"Let", b" me", b"</", b"think", b">", b"Yes"], 5),  # the tag's tokens are thinking
    ([b"Hm", b"</think>", b"Yes", b"</think>"], 2),  # the first tag ends it
    ([b"x</th", b"ink>y", b"z"], 2),  # the token that completes the tag, whatever else it holds
    ([b"never", b" ends", b"</thin"], 3),  # no tag: all thinking
    ([], 0),
])
def test_thinking_tokens_run_to_the_one_completing_the_tag_however_they_arrive(tokens, thinking):
    from glm4serve.chat.reasoning import ThinkingTokens

    rng = random.Random(len(tokens))
    for _ in range(20):
        counter, taken, i = ThinkingTokens(), 0, 0
        while i < len(tokens):  # in outputs of 1-3 tokens, as speculative steps deliver them
            k = rng.randint(1, 3)
            taken += counter.feed(tokens[i : i + k])
            i += k
        assert counter.count == taken == thinking
        assert counter.done == (b"</think>" in b"".join(tokens))
