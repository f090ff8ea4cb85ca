"""Tensor parallelism (model/shard.py, model/tp.py) on CPU over gloo: each rank loads its cut of the
weights, N ranks give N=1's greedy tokens and logits and transformers' tokens, with more ranks than KV
groups too; the real server with --tensor-parallel-size 2 passes the end-to-end chat, streaming and
tool-call tests, and stops when a rank dies."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.glm4 import load_model
from glm4serve.model.random_checkpoint import write_random_checkpoint
from glm4serve.model.runner import EagerRunner
from glm4serve.model.shard import Shard
from glm4serve.server import build_llm_engine
from server_proc import ServerProcess
from steering import write_steered_checkpoint
from test_e2e_server import (  # noqa: F401 - collected here again, against this module's TP servers
    test_bad_requests_get_4xx_and_the_server_stays_healthy,
    test_chat_stream_and_whole_give_the_same_text_at_temperature_0,
    test_completions_text_and_token_ids,
    test_disconnect_mid_stream_frees_the_kv_blocks,
    test_n2_seeded_and_logprobs,
    test_steered_reply_without_tools_is_plain_text_and_a_cut_call_is_length,
    test_steered_tool_call_through_the_sdk_stream_helper,
    test_steered_tool_call_whole,
    test_stop_string_cuts_the_reply,
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16, rope_theta=5e6)
# The end-to-end tests' model: "wide"-like, with heads two ranks can share (whose greedy reply has words)
E2E = dict(hidden_size=96, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=24,
           rope_theta=5e6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """kv_heads 2 (two ranks hold one KV group each) or 1 (two ranks hold the same one)."""
    made = {}

    def make(variant: str, kv_heads: int, layout: str = "hf"):
        key = (variant, kv_heads, layout)
        if key not in made:
            made[key] = write_random_checkpoint(tmp_path_factory.mktemp(f"tp-{variant}-{kv_heads}-{layout}"),
                                                variant=variant, layout=layout, num_kv_heads=kv_heads, **SMALL)
        return made[key]

    return make


@pytest.mark.parametrize("variant,layout", [("glm4", "hf"), ("glm", "chatglm")])  # q/k/v split, or fused on disk
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_each_rank_holds_its_cut_of_every_weight(checkpoint, kv_heads, variant, layout):
    path = checkpoint(variant, kv_heads, layout)
    whole = dict(load_model(path, dtype=torch.float32).named_parameters())
    for rank in range(2):
        shard = Shard(rank, 2)
        part = load_model(path, dtype=torch.float32, shard=shard)
        for name, p in part.named_parameters():
            cut = shard.cut(name, part.cfg)
            want = whole[name] if cut is None else torch.cat(
                [whole[name].narrow(cut[0], a, b - a) for a, b in cut[1]], dim=cut[0])
            assert torch.equal(p, want), name
    assert part.layers[0].attn.num_kv_heads == 1  # one each, or the same one replicated


def greedy(engine, prompts) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=1 + i % 2))
    tokens: dict = {}
    while engine.has_work:
        for o in engine.step():
            tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
    assert engine.pool.num_used == 0
    return tokens


@pytest.mark.parametrize("variant,kv_heads", [("glm", 2), ("glm4", 2), ("glm", 1)])
def test_two_ranks_give_one_rank_greedy_tokens_logits_and_transformers_tokens(checkpoint, variant, kv_heads):
    from transformers import AutoModelForCausalLM

    path = checkpoint(variant, kv_heads)
    prompts = [[11, 23, 5, 99, 42, 7, 64, 3], [5, 6, 7], list(range(40, 70))]
    # one forward's logits after every token (prompt logprobs' rows), every rank's parts combined
    chunk = [SeqChunk(prompts[0], 0, [0, 1], all_logits=True)]
    got = {}
    for world in (1, 2):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", tensor_parallel_size=world,
                                             num_kv_blocks=64, block_size=4))
        try:
            got[world] = greedy(engine, prompts), engine.runner.execute(ScheduledBatch(chunk))
        finally:
            engine.close()
    assert got[2][0] == got[1][0]
    one, two = got[1][1], got[2][1]
    assert one.shape[0] == two.shape[0] == len(prompts[0])
    assert (two - one).abs().max().item() <= 1e-4 * max(one.abs().max().item(), 1.0)  # fp32: order of sums only
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompts[0]):].tolist()
    assert got[2][0]["r0", 0] == expected


def test_hf_overrides_reach_every_rank(checkpoint):
    """--hf-overrides' YaRN, on a checkpoint whose config has none: one rank and two give the logits of the model
    loaded with it, not those of plain RoPE, and serve the stretched context."""
    from conftest import YARN_SCALINGS

    path, overrides = checkpoint("glm4", 2), {**YARN_SCALINGS["4.x"], "max_position_embeddings": 64}
    chunk = [SeqChunk(list(range(5, 105)), 0, list(range(25)))]  # past the trained context of 64
    want = load_model(path, dtype=torch.float32, hf_overrides=overrides)
    assert want.cfg.yarn is not None
    expected = EagerRunner(want, 64, 4).execute(ScheduledBatch(chunk))
    plain = EagerRunner(load_model(path, dtype=torch.float32), 64, 4).execute(ScheduledBatch(chunk))
    assert not torch.allclose(plain, expected, atol=1e-3)
    for world in (1, 2):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", tensor_parallel_size=world,
                                             num_kv_blocks=64, block_size=4, hf_overrides=overrides))
        try:
            got = engine.runner.execute(ScheduledBatch(chunk))
            assert engine.scheduler.cfg.max_model_len == 256  # 4 x the trained 64
        finally:
            engine.close()
        expected = expected[:, : got.shape[1]]  # the engine's runner leaves out the ids past the tokenizer's
        assert (got - expected).abs().max().item() <= 1e-4 * max(expected.abs().max().item(), 1.0), world


@pytest.mark.parametrize("scheme,tolerance", [("int8", 3e-2), ("int4", 2e-1)])
def test_two_ranks_serve_quantized_weights(checkpoint, scheme, tolerance):
    """Each rank quantizes its own cut while loading; a row cut in two gets two scales, and an int4
    group may be narrower, so the logits are close to one rank's, not equal."""
    path = checkpoint("glm4", 2)
    chunk = [SeqChunk(list(range(5, 30)), 0, list(range(7)))]
    logits = {}
    for world in (1, 2):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", quantization=scheme,
                                             tensor_parallel_size=world, num_kv_blocks=64, block_size=4))
        try:
            logits[world] = engine.runner.execute(ScheduledBatch(chunk))
        finally:
            engine.close()
    assert (logits[2] - logits[1]).abs().max().item() <= tolerance * logits[1].abs().max().item()


def test_two_ranks_hold_an_fp8_kv_cache_each(checkpoint):
    """--kv-cache-dtype fp8 reaches every rank (rank 0 plans it): two ranks' logits are one rank's over its own fp8
    cache, but for the few K/V elements whose sums, taken in another order, round to another e4m3 value."""
    path = checkpoint("glm4", 2)
    chunk = [SeqChunk(list(range(5, 30)), 0, list(range(7)))]
    logits = {}
    for world in (1, 2):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", kv_cache_dtype="fp8",
                                             tensor_parallel_size=world, num_kv_blocks=64, block_size=4))
        try:
            runner = engine.runner.runner if world == 2 else engine.runner
            assert runner.kv.k[0].dtype == torch.float8_e4m3fn
            logits[world] = engine.runner.execute(ScheduledBatch(chunk))
        finally:
            engine.close()
    assert (logits[2] - logits[1]).abs().max().item() <= 1e-2 * logits[1].abs().max().item()


@pytest.mark.cuda
def test_the_nccl_path_runs_one_rank_on_a_gpu_as_the_plain_engine_does(checkpoint):
    """The tensor-parallel code path on NCCL with a single rank (one GPU): the same greedy tokens."""
    from glm4serve.model.tokenizer import Tokenizer
    from glm4serve.model.tp import TensorParallelRunner
    from glm4serve.server import engine_for_model

    path = checkpoint("glm", 2)
    args = EngineArgs(model=str(path), dtype="float32", device="cuda", num_kv_blocks=64, block_size=4)
    prompts = [[11, 23, 5, 99, 42, 7, 64, 3], [5, 6, 7]]
    plain = build_llm_engine(args)
    want = greedy(plain, prompts)
    tp = TensorParallelRunner.start(path, "float32", "cuda", None, world=1)
    engine = engine_for_model(tp.model, Tokenizer.from_dir(path), args, "cuda", tp)
    try:
        assert greedy(engine, prompts) == want
    finally:
        engine.close()


def test_a_model_that_does_not_divide_is_refused_before_anything_starts(make_checkpoint):
    path = make_checkpoint("glm", "hf", "wide")  # 6 heads over 3 KV groups
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide"):
        build_llm_engine(EngineArgs(model=str(path), tensor_parallel_size=4, num_kv_blocks=64))


# ---- the real server with two ranks: the end-to-end tests imported above run against these


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("tp-e2e"), variant="glm", **E2E)
    s = ServerProcess(path, "--served-model-name", "glm4-test", "--tensor-parallel-size", "2")
    yield s.wait_healthy(timeout=180)
    s.stop()


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    path = write_steered_checkpoint(tmp_path_factory.mktemp("steered-tp"),
                                    ["<|assistant|>", 'get_weather\n{"city": "北京"}', "<|observation|>"])
    s = ServerProcess(path, "--served-model-name", "glm4-steered", "--tensor-parallel-size", "2")
    yield s.wait_healthy(timeout=180)
    s.stop()


def _children(pid: int) -> list[int]:
    """Child processes of any of its threads (the engine's thread starts the ranks)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def test_a_rank_that_dies_stops_the_server_with_an_error(checkpoint):
    s = ServerProcess(checkpoint("glm", 2), "--tensor-parallel-size", "2").wait_healthy(timeout=180)
    try:
        workers = [p for p in _children(s.proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(workers) == 1, "one worker process: rank 1"
        os.kill(workers[0], signal.SIGKILL)
        s.proc.wait(timeout=10)  # within seconds, not a hang
        assert s.proc.returncode == 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
        assert "rank" in s.log_path.read_text() and "died" in s.log_path.read_text()
    finally:
        s.stop()


def test_sigterm_stops_every_rank(checkpoint):
    s = ServerProcess(checkpoint("glm", 2), "--tensor-parallel-size", "2").wait_healthy(timeout=180)
    workers = [p for p in _children(s.proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 1
    assert s.stop() == 0
    time.sleep(1)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
