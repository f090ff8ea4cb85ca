"""Background responses (`background: true`): queued at once, polled, streamed and followed again from any
event, cancelled, failed; the engine request ends with them, the gate counts them, and a client that goes away
leaves them running. Through the real OpenAI SDK over uvicorn, as clients use them."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.api_fakes import MODEL, engine_of, make_app, served, shutdown_engines, wait_idle  # noqa: F401

LONG = "\n" + "word " * 60  # many steps: time to see it run, and to cancel it


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10,
                         _strict_response_validation=True)


def until(client: openai.OpenAI, response_id: str, *statuses: str, timeout: float = 10.0):
    """The response once in one of `statuses`; "writing": in progress with some output text (the engine runs it)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(response_id)
        if r.status in statuses or ("writing" in statuses and r.status == "in_progress" and r.output_text):
            return r
        assert time.monotonic() < deadline, f"still {r.status}"
        time.sleep(0.02)


def test_a_background_response_is_queued_then_polled_to_its_end_and_stored():
    app = make_app(replies=["\nHello there!"], step_delay=0.02)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        assert made.status == "queued" and made.background is True and made.output == []
        done = until(client, made.id, "completed")
        assert done.output_text == "Hello there!" and done.background is True and done.usage.output_tokens > 0
        # stored as any response: a follow-up continues it, and its input items are listed
        follow = client.responses.create(model=MODEL, input="more", previous_response_id=made.id)
        assert follow.status == "completed"
        assert [i.type for i in client.responses.input_items.list(made.id).data] == ["message"]
        # cancelling one that ended gives it as it is
        assert client.responses.cancel(made.id).status == "completed"
    wait_idle(engine_of(app))


def test_a_streamed_one_is_followed_again_from_any_event():
    app = make_app(replies=["\nHello there!"], step_delay=0.01)
    with served(app) as url:
        client = sdk(url)
        events = list(client.responses.create(model=MODEL, input="hi", background=True, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].type == "response.completed" and events[-1].response.background is True
        response_id = events[0].response.id
        for after in (-1, 3, len(events) - 2):
            again = list(client.responses.retrieve(response_id, stream=True, starting_after=after))
            assert [e.model_dump() for e in again] == [e.model_dump() for e in events[after + 1:]]
        # a response not run in the background has no stream to follow
        plain = client.responses.create(model=MODEL, input="hi")
        with pytest.raises(openai.BadRequestError, match="background"):
            list(client.responses.retrieve(plain.id, stream=True))


def test_a_client_that_goes_away_leaves_it_running():
    app = make_app(replies=[LONG], step_delay=0.01)
    with served(app) as url:
        with httpx.stream("POST", url + "/v1/responses", json={"model": MODEL, "input": "hi", "background": True,
                                                                "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
        response_id = openai.types.responses.ResponseCreatedEvent.model_validate_json(first[5:]).response.id
        done = until(sdk(url), response_id, "completed", "incomplete")
        assert done.output_text == LONG[1:]
    wait_idle(engine_of(app))


def test_cancel_stops_the_engine_request_and_keeps_the_output_so_far():
    app = make_app(replies=[LONG], step_delay=0.05)
    engine = engine_of(app)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        running = until(client, made.id, "writing")
        assert running.background is True and running.output[0].status == "in_progress"
        cancelled = client.responses.cancel(made.id)
        assert cancelled.status == "cancelled" and running.output_text in cancelled.output_text
        assert len(cancelled.output_text) < len(LONG) - 1 and cancelled.output[0].status == "incomplete"
        wait_idle(engine)  # aborted: its sequence and KV blocks are gone
        assert client.responses.retrieve(made.id).status == "cancelled"
        assert client.responses.cancel(made.id).model_dump() == cancelled.model_dump()  # again: as it is
        # a response not run in the background cannot be cancelled
        plain = client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
        with pytest.raises(openai.BadRequestError, match="Only background responses"):
            client.responses.cancel(plain.id)
        # deleting a running one stops it too
        made = client.responses.create(model=MODEL, input="hi", background=True)
        until(client, made.id, "writing")
        client.responses.delete(made.id)
        wait_idle(engine)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(made.id)


def test_a_failure_midway_is_a_failed_response_to_poll():
    app = make_app(replies=[LONG], fail_after_steps=4)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        failed = until(client, made.id, "failed")
        assert failed.error is not None and "failed" in failed.error.message
    wait_idle(engine_of(app))


def test_a_running_one_counts_at_the_gate():
    app = make_app(replies=[LONG], step_delay=0.02, max_num_seqs=1, max_waiting_requests=0)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
        until(client, made.id, "completed", "incomplete")
        assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).status == "incomplete"


def test_refused_without_a_store_and_checked_before_it_runs():
    app = make_app(response_store_memory=0)
    with served(app) as url:
        client = sdk(url)
        with pytest.raises(openai.BadRequestError, match="stores none") as e:
            client.responses.create(model=MODEL, input="hi", background=True)
        assert e.value.body["param"] == "background"
    app = make_app(max_model_len=64)
    with served(app) as url:
        with pytest.raises(openai.BadRequestError, match="context"):  # a 400 at once, not a failed response later
            sdk(url).responses.create(model=MODEL, input="hi " * 100, background=True)


def sse_json(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def test_a_follower_of_a_cancelled_one_gets_its_items_closed_and_its_end():
    app = make_app(replies=[LONG], step_delay=0.05)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        until(client, made.id, "writing")
        with httpx.Client(base_url=url, timeout=10) as http:
            with http.stream("GET", f"/v1/responses/{made.id}", params={"stream": "true"}) as follower:
                client.responses.cancel(made.id)
                events = sse_json(follower.read().decode())
            stored = http.get(f"/v1/responses/{made.id}").json()
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                                    "response.output_item.done", "response.cancelled"]
        assert events[-2]["item"]["status"] == "incomplete"
        assert events[-1]["response"]["status"] == "cancelled" and events[-1]["response"] == stored
    wait_idle(engine_of(app))


def test_a_failed_stream_is_followed_again_to_its_failed_response():
    app = make_app(replies=[LONG], fail_after_steps=4)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        until(client, made.id, "failed")
        with httpx.Client(base_url=url, timeout=10) as http:
            events = sse_json(http.get(f"/v1/responses/{made.id}", params={"stream": "true"}).text)
            assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            after_error = sse_json(http.get(f"/v1/responses/{made.id}", params={
                "stream": "true", "starting_after": events[-2]["sequence_number"]}).text)
        assert [e["type"] for e in after_error] == ["response.failed"]


def test_the_gate_counts_a_streamed_one_once_and_frees_it():
    app = make_app(replies=[LONG], step_delay=0.02, max_num_seqs=2, max_waiting_requests=0)
    gate = app.state.gate
    with served(app) as url:
        client = sdk(url)
        with httpx.Client(base_url=url, timeout=10) as http, http.stream("POST", "/v1/responses", json={
                "model": MODEL, "input": "hi", "background": True, "stream": True}) as r:
            next(r.iter_lines())
            assert gate.num_generating == 1  # the job, not its POST as well
            assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).status == "incomplete"
        deadline = time.monotonic() + 10
        while gate.num_generating:  # the job runs on after its POST's stream closed, then ends
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (gate.num_generating, gate.num_in_flight) == (0, 0)


def test_a_running_one_is_no_previous_response_yet_but_lists_its_input():
    app = make_app(replies=[LONG], step_delay=0.05)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True)
        with pytest.raises(openai.BadRequestError, match="still in progress") as e:
            client.responses.create(model=MODEL, input="more", previous_response_id=made.id)
        assert e.value.body["param"] == "previous_response_id"
        assert [i.type for i in client.responses.input_items.list(made.id).data] == ["message"]
        client.responses.cancel(made.id)
    wait_idle(engine_of(app))


def test_the_oldest_finished_streams_go_first(monkeypatch):
    from glm4serve.api import background

    monkeypatch.setattr(background, "FINISHED_EVENTS_BYTES", 6000)
    app = make_app(replies=["\nHello there!"])
    with served(app) as url:
        client = sdk(url)
        ids = []
        for _ in range(4):
            ids.append(client.responses.create(model=MODEL, input="hi", background=True).id)
            until(client, ids[-1], "completed")
        assert len(list(client.responses.retrieve(ids[-1], stream=True))) > 0  # the newest is kept
        with pytest.raises(openai.BadRequestError, match="background"):
            list(client.responses.retrieve(ids[0], stream=True))
        assert client.responses.retrieve(ids[0]).status == "completed"  # the response itself is the store's


def test_cancelled_before_it_began_it_still_ends_and_frees_the_gate():
    import asyncio

    from glm4serve.api.background import BackgroundResponses
    from glm4serve.api.gate import Gate
    from glm4serve.api.response_store import ResponseStore

    class Builder:  # the one thing a job reads of a ResponseBuilder that never ran
        fixed = {"id": "resp_1"}
        input_items: list = []

        def response(self, status):
            return {"id": "resp_1", "status": status, "output": []}

    async def never():
        raise AssertionError("never runs")
        yield b""

    async def main():
        gate, store = Gate(capacity=1, max_body_bytes=1), ResponseStore(1 << 20)
        jobs = BackgroundResponses(gate, store)
        job = jobs.start(Builder(), never)
        final = await jobs.cancel(job)
        assert final["status"] == "cancelled" and job.done
        assert (gate.num_generating, gate.num_in_flight) == (0, 0)
        assert store.get("resp_1").response["status"] == "cancelled"
        assert [e async for e in jobs.follow(job)] == []  # a follower ends at once

    asyncio.run(main())


def test_a_held_call_keeps_its_followers_alive_and_a_cancel_leaves_no_gap():
    """The job says response.in_progress while a call is held (its stream kept alive as any Responses stream),
    numbered among its events; cancelled mid-beat, its stream still has every event, in order."""
    call = 'get_weather\n{"city": "' + "Paris " * 20 + '"}'
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    app = make_app(replies=[call], step_delay=0.03, sse_ping_seconds=0.02)
    with served(app) as url:
        client = sdk(url)
        made = client.responses.create(model=MODEL, input="hi", background=True, tools=[tool])
        done = until(client, made.id, "completed")
        assert done.output[0].name == "get_weather"
        events = list(client.responses.retrieve(made.id, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events].count("response.in_progress") > 3
        made = client.responses.create(model=MODEL, input="hi", background=True, tools=[tool])
        time.sleep(0.3)
        client.responses.cancel(made.id)
        with httpx.Client(base_url=url, timeout=10) as http:
            events = sse_json(http.get(f"/v1/responses/{made.id}", params={"stream": "true"}).text)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.cancelled"
    wait_idle(engine_of(app))
