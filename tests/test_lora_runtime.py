"""LoRA adapters loaded and unloaded while the server runs (engine.load_lora / unload_lora, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter): an adapter loaded late serves as one loaded at
start; requests running with an adapter that goes finish with it; a name loaded again never meets the
KV blocks its predecessor cached."""

from __future__ import annotations

import gc
import json
import weakref

import httpx
import pytest

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.glm4 import load_model
from glm4serve.model.lora import LoRAError, load_loras
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from tests.engine_fakes import sched_config
from tests.test_lora import adapters, base, peft_logits, run  # noqa: F401 - adapters and base are fixtures

BLOCK = 4
GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(base, startup: dict[str, str] | None = None) -> LLMEngine:
    """An engine serving the adapters of `startup` (name -> folder) from its start, and ready for more."""
    tokenizer = Tokenizer.from_dir(base)
    model = load_model(base, dtype="float32")
    loras = load_loras(startup or {}, model)
    runner = make_runner(model, 64, BLOCK, tokenizer.vocab_size, loras=loras)
    cfg = sched_config(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=BLOCK)
    return LLMEngine(runner, tokenizer, cfg, BlockPool(64, BLOCK), tokenizer.stop_token_ids, loras=loras)


def one(engine: LLMEngine, rid: str, ids: list[int], lora: str | None, max_tokens: int = 5) -> tuple[list[int], int]:
    engine.add_request(rid, ids, SamplingParams(lora=lora, max_tokens=max_tokens, **GREEDY))
    return run(engine, [])[rid]


def test_an_adapter_loaded_late_serves_as_one_loaded_at_start(base, adapters):
    ids = list(range(100, 117))
    at_start = make_engine(base, {"all": str(adapters["all"])})
    late = make_engine(base)
    with pytest.raises(ValueError, match="no LoRA adapter 'all'"):
        late.add_request("early", ids, SamplingParams(lora="all"))
    late.load_lora("all", str(adapters["all"]))
    want = one(at_start, "a", ids, "all")[0]
    assert one(late, "a", ids, "all")[0] == want
    assert want != one(late, "b", ids, None)[0]  # the adapter changes the reply: the check above can fail


def test_unloading_refuses_new_requests_and_lets_running_ones_finish_with_it(base, adapters):
    ids = list(range(300, 311))
    reference = make_engine(base, {"x": str(adapters["all"])})
    want = one(reference, "r", ids, "x", max_tokens=8)[0]
    engine = make_engine(base)
    engine.load_lora("x", str(adapters["all"]))
    engine.add_request("running", ids, SamplingParams(lora="x", max_tokens=8, **GREEDY))
    out: dict = {}
    for _ in range(3):  # its prompt and a couple of tokens
        for o in engine.step():
            out["running"] = (out.get("running", ([], 0))[0] + o.token_ids, 0)
    adapter = weakref.ref(engine.loras.adapters["x"])
    engine.unload_lora("x")
    with pytest.raises(ValueError, match="no LoRA adapter 'x'"):
        engine.add_request("new", ids, SamplingParams(lora="x"))
    assert "x" in engine.loras.adapters  # still running a sequence
    assert run(engine, [], out)["running"][0] == want
    gc.collect()
    assert engine.loras.adapters == {} and adapter() is None  # its tensors let go once nothing runs it
    with pytest.raises(KeyError):
        engine.unload_lora("x")


def test_a_name_loaded_again_never_reads_its_predecessors_cached_blocks(base, adapters):
    """"x" is one adapter, then another: the second never reads the K/V the first wrote for a prompt,
    a request that ran with the first finishes with it, and the base model keeps its own cache."""
    ids = list(range(200, 233))  # 8 full blocks and one token
    engine = make_engine(base)
    engine.load_lora("x", str(adapters["all"]))
    assert one(engine, "a1", ids, "x")[1] == 0
    assert one(engine, "a2", ids, "x")[1] == 32  # the cache works, so the check below can fail
    engine.add_request("old", ids, SamplingParams(lora="x", max_tokens=6, **GREEDY))
    engine.step()
    with pytest.raises(ValueError, match="has already been loaded"):
        engine.load_lora("x", str(adapters["attn"]))
    engine.load_lora("x", str(adapters["attn"]), replace=True)
    engine.add_request("new", ids, SamplingParams(lora="x", max_tokens=6, **GREEDY))
    out = run(engine, [], {"old": (engine.scheduler.seqs_of("old")[0].output_token_ids[:], 0)})
    fresh_all, fresh_attn = (make_engine(base, {"x": str(adapters[a])}) for a in ("all", "attn"))
    assert out["old"][0] == one(fresh_all, "o", ids, "x", max_tokens=6)[0]
    assert out["new"] == (one(fresh_attn, "n", ids, "x", max_tokens=6)[0], 0)
    assert out["old"][0] != out["new"][0]
    assert list(engine.loras.adapters) == ["x#1"] and engine.lora_keys == {"x": "x#1"}
    engine.unload_lora("x")
    engine.load_lora("x", str(adapters["all"]))  # the first adapter again, under a key of its own
    assert engine.lora_keys == {"x": "x#2"} and one(engine, "a3", ids, "x")[1] == 0


def test_a_load_that_fails_changes_nothing(base, adapters, tmp_path):
    engine = make_engine(base)
    engine.load_lora("x", str(adapters["all"]))
    with pytest.raises(LoRAError, match="cannot read"):
        engine.load_lora("y", str(tmp_path / "nowhere"))
    with pytest.raises(LoRAError, match="cannot read"):
        engine.load_lora("x", str(tmp_path / "nowhere"), replace=True)
    assert engine.lora_keys == {"x": "x"} and list(engine.loras.adapters) == ["x"]
    without = make_engine(base)
    without.loras = None  # as an engine built with no LoRASet
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        without.load_lora("x", str(adapters["all"]))


def test_a_late_adapter_wraps_the_layers_the_first_left_alone(base, adapters):
    """"attn" changes attention only; "all" loaded after it also needs the MLP's linears wrapped."""
    engine = make_engine(base)
    engine.load_lora("attn", str(adapters["attn"]))
    engine.load_lora("all", str(adapters["all"]))
    ids = list(range(50, 70))
    assert one(engine, "a", ids, "all")[0] == one(make_engine(base, {"all": str(adapters["all"])}), "a", ids, "all")[0]


def test_runtime_updating_needs_one_engine():
    from glm4serve.api.settings import ServerSettings

    with pytest.raises(ValueError, match="allow_runtime_lora_updating needs one engine"):
        ServerSettings(allow_runtime_lora_updating=True, num_replicas=2)


@pytest.fixture(scope="module")
def server(base):
    from tests.server_proc import ServerProcess

    s = ServerProcess(base, "--served-model-name", "glm4-test", "--allow-runtime-lora-updating",
                      "--api-key", "k").wait_healthy()
    yield s
    s.stop()


def test_the_server_loads_and_unloads_adapters_as_vllm_does(server, base, adapters):
    """Through the OpenAI SDK and vLLM's admin routes: load, serve, replace, unload; refusals are
    OpenAI errors naming what is wrong."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    admin = httpx.Client(base_url=server.url + "/v1", headers={"Authorization": "Bearer k"}, timeout=60)
    assert [m.id for m in client.models.list().data] == ["glm4-test"]
    assert httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "x"}
                      ).status_code == 401  # behind the API key like every /v1 route

    r = admin.post("/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapters["all"])})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == ["glm4-test", "sql"] and models["sql"].model_extra["parent"] == "glm4-test"
    ids = list(range(300, 313))
    vocab = Tokenizer.from_dir(base).vocab_size

    def greedy(model: str) -> list[int]:
        reply = client.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        assert reply.model == model
        return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]

    def peft_greedy(adapter) -> list[int]:
        tokens = list(ids)
        for _ in range(3):
            tokens.append(int(peft_logits(base, adapter, tokens)[-1, :vocab].argmax()))
        return tokens[len(ids):]

    assert greedy("sql") == peft_greedy(adapters["all"])

    def refused(path: str, body: dict, status: int, message: str) -> None:
        # json.dumps escapes a lone surrogate (as a client may send it), where httpx's json= cannot encode it
        r = admin.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text

    refused("/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["attn"])}, 400,
            "The lora adapter 'sql' has already been loaded.")
    refused("/load_lora_adapter", {"lora_name": "bad", "lora_path": "/nowhere"}, 400, "cannot read /nowhere")
    refused("/load_lora_adapter", {"lora_name": "glm4-test", "lora_path": str(adapters["all"])}, 400,
            "the served model's name")
    refused("/load_lora_adapter", {"lora_name": "", "lora_path": ""}, 400, "must be provided")
    refused("/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path")
    refused("/load_lora_adapter", {"lora_name": "z\ud800", "lora_path": str(adapters["all"])}, 400, "surrogate")
    refused("/load_lora_adapter", {"lora_name": "r0", "lora_path": "~no-such-user-here/x"}, 400, "cannot read")
    r = admin.post("/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapters["attn"]),
                                               "load_inplace": True})
    assert r.status_code == 200
    assert greedy("sql") == peft_greedy(adapters["attn"])
    assert admin.post("/unload_lora_adapter", json={"lora_name": "sql"}).text == \
        "Success: LoRA adapter 'sql' removed successfully."
    refused("/unload_lora_adapter", {"lora_name": "sql"}, 404, "The lora adapter 'sql' cannot be found.")
    assert [m.id for m in client.models.list().data] == ["glm4-test"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql", prompt=ids, max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200
    assert len(greedy("glm4-test")) == 3  # the base model serves on
