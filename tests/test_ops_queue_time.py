"""Output.queue_time: seconds from a request's arrival in the engine to its first scheduling,
which feeds glm4serve:request_queue_time_seconds."""

from __future__ import annotations

from tests.engine_fakes import FakeTokenizer
from tests.test_engine_loop import greedy, make_engine, prompt_of


def test_queue_time_is_the_wait_for_a_seat():
    # One seat: the second request waits while the first runs (each forward sleeps 10 ms).
    engine, _, pool = make_engine(max_num_seqs=1, delay=0.01, tokenizer=FakeTokenizer())
    engine.add_request("a", prompt_of(0, 8), greedy(max_tokens=5, ignore_eos=True))
    engine.add_request("b", prompt_of(1, 8), greedy(max_tokens=5, ignore_eos=True, n=1))
    seen: dict[str, list] = {"a": [], "b": []}
    while engine.has_work:
        for out in engine.step():
            seen[out.request_id].append(out.queue_time)
    assert len(seen["a"]) == len(seen["b"]) == 5
    qa, qb = seen["a"][0], seen["b"][0]
    assert qa is not None and qb is not None
    assert set(seen["a"]) == {qa} and set(seen["b"]) == {qb}  # one value per choice, never re-measured
    assert 0 <= qa < 0.01
    assert qb >= 5 * 0.01  # b waited through a's five forwards
    assert pool.num_used == 0


def test_queue_time_is_none_before_scheduling_then_the_requests_on_every_choice():
    engine, _, _ = make_engine(tokenizer=FakeTokenizer())
    engine.add_request("w", prompt_of(2, 4), greedy(max_tokens=3, ignore_eos=True))
    (aborted,) = engine.abort("w")  # never scheduled
    assert aborted.queue_time is None and aborted.finish_reason == "abort"
    engine.add_request("n", prompt_of(3, 4), greedy(max_tokens=2, ignore_eos=True, n=2))
    first = {}
    while engine.has_work:
        for out in engine.step():
            first.setdefault(out.index, out.queue_time)
    assert first[0] is not None and first[1] is not None  # choices fork at the request's admission
