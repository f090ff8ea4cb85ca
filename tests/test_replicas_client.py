"""The ingress's ReplicaClient over two engine replicas of a Ray Serve app started in this process (the
server's tests, test_replicas.py, run it in a subprocess behind HTTP): what only the client itself can ask
of the replicas. Here: one choice of a request ends on whichever replica runs it while its sibling goes on."""

from __future__ import annotations

import asyncio

import pytest

from glm4serve.engine.types import ABORT, LENGTH, SamplingParams

NEW_TOKENS = 200
END_AFTER = 3  # choice 0's tokens before the client ends it


@pytest.fixture(scope="module")
def client(make_checkpoint):
    import ray
    from ray import serve

    from glm4serve import cluster
    from glm4serve.api.settings import ServerSettings
    from glm4serve.model.tokenizer import Tokenizer

    checkpoint = make_checkpoint("glm", "hf", "small")
    settings = ServerSettings(model=str(checkpoint), num_replicas=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        replicas = cluster.EngineReplica.options(num_replicas=2, ray_actor_options={"num_cpus": 1})
        handle = serve.run(replicas.bind(settings, cluster.StatsBoard.bind()), name="replicas", route_prefix=None)
        yield cluster.ReplicaClient(handle, None, settings, Tokenizer.from_dir(checkpoint), 4096)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ending_one_choice_stops_it_on_its_replica_while_its_sibling_goes_on(client):
    """parallel_tool_calls false ends a choice at its first whole call (api/chat.py, end_choice); the Serve
    handle routes calls to a replica of its own choosing, so the abort must still reach the one decoding it."""
    async def run(request_id: str, prompt: list[int]) -> tuple[dict, dict]:
        tokens, reasons, asked = {0: 0, 1: 0}, {}, False
        params = SamplingParams(max_tokens=NEW_TOKENS, n=2, ignore_eos=True, temperature=0)
        async for out in client.generate(prompt, params, request_id):
            tokens[out.index] += len(out.token_ids)
            if out.finish_reason is not None:
                reasons[out.index] = out.finish_reason
            if out.index == 0 and tokens[0] >= END_AFTER and not asked:
                asked = True
                client.abort(request_id, 0)
        return tokens, reasons

    async def several() -> list[tuple[dict, dict]]:
        # one after another, each to either replica (both idle: the router picks at random)
        return [await run(f"r{k}", [1, 2, 3 + k]) for k in range(4)]

    for tokens, reasons in asyncio.run(several()):
        assert reasons == {0: ABORT, 1: LENGTH}, (tokens, reasons)
        assert tokens[1] == NEW_TOKENS
        assert END_AFTER <= tokens[0] < NEW_TOKENS // 2, tokens  # stopped within a few steps of the abort
