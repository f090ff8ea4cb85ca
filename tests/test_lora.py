"""LoRA adapters (model/lora.py): our model with an adapter against transformers with the same adapter
applied by PEFT; several adapters and the base model in one batch; the prefix cache kept apart per
adapter; adapters we cannot run refused when loading."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.glm4 import load_model
from glm4serve.model.lora import LoRAError, load_adapter, load_loras
from glm4serve.model.random_checkpoint import write_random_adapter
from glm4serve.model.runner import make_runner
from glm4serve.model.tokenizer import Tokenizer
from tests.engine_fakes import sched_config

BLOCK = 4


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint("glm", "hf", "small")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "all": write_random_adapter(root / "all", base, rank=4, alpha=8.0, seed=1),
        "attn": write_random_adapter(root / "attn", base, rank=2, alpha=4.0, targets=("attn.qkv", "attn.o"), seed=2),
    }


def peft_logits(base, adapter_dir, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [len, V]


def hf_logits(base, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(torch.tensor([ids])).logits[0]


def runner_with(base, adapters: dict, vocab_limit: int | None = None):
    model = load_model(base, dtype="float32")
    loras = load_loras({name: str(path) for name, path in adapters.items()}, model)
    return make_runner(model, 64, BLOCK, vocab_limit, loras=loras)


def test_adapters_and_base_in_one_batch_match_peft(base, adapters):
    """One forward: a prompt with each adapter, one without, and a decode with an adapter."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (11, 7, 9, 6)]
    names = ["all", None, "attn", "all"]
    runner = runner_with(base, adapters)
    chunks, next_block = [], 0
    for ids, name in zip(prompts, names):
        blocks = list(range(next_block, next_block + -(-len(ids) // BLOCK)))
        next_block += len(blocks)
        chunks.append(SeqChunk(ids, 0, blocks, all_logits=True, lora=name))
    # the last prompt's last token as a decode (one-token chunk) after its other tokens
    last = chunks.pop()
    prefix = SeqChunk(last.token_ids[:-1], 0, last.block_table, want_logits=False, lora="all")
    runner.execute(ScheduledBatch([prefix]))
    chunks.append(SeqChunk(last.token_ids[-1:], len(last.token_ids) - 1, last.block_table, lora="all"))
    logits = runner.execute(ScheduledBatch(chunks))
    expected = torch.cat([
        peft_logits(base, adapters["all"], prompts[0]),
        hf_logits(base, prompts[1]),
        peft_logits(base, adapters["attn"], prompts[2]),
        peft_logits(base, adapters["all"], prompts[3])[-1:],
    ])
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    # and the adapters do change the model: the test would pass vacuously otherwise
    assert (peft_logits(base, adapters["all"], prompts[1]) - hf_logits(base, prompts[1])).abs().max() > 1e-2


def test_a_chatglm_named_adapter_lands_on_the_same_rows(base, adapters, tmp_path):
    """An HF adapter's q, k and v LoRAs written as chatglm's one LoRA of the fused qkv (A stacked, B
    block-diagonal, rank 3r, alpha 3x: the same scale) give the same sums."""
    cfg = load_model(base, dtype="float32").cfg
    hf = load_file(adapters["attn"] / "adapter_model.safetensors")
    theirs = {}
    for i in range(cfg.num_layers):
        pre, new = f"base_model.model.model.layers.{i}.self_attn.", f"base_model.model.transformer.encoder.layers.{i}."
        theirs[new + "self_attention.query_key_value.lora_A.weight"] = torch.cat(
            [hf[pre + f"{p}_proj.lora_A.weight"] for p in "qkv"])  # [3r, in]
        theirs[new + "self_attention.query_key_value.lora_B.weight"] = torch.block_diag(
            *[hf[pre + f"{p}_proj.lora_B.weight"] for p in "qkv"])  # [q + k + v rows, 3r]
    save_file(theirs, tmp_path / "adapter_model.safetensors")
    config = json.loads((adapters["attn"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3 * config["r"],
                                                              "lora_alpha": 3 * config["lora_alpha"]}))
    ours = load_adapter("x", tmp_path, cfg, torch.float32, "cpu")
    reference = load_adapter("y", adapters["attn"], cfg, torch.float32, "cpu")
    x = torch.randn(5, cfg.hidden_size)
    for i in range(cfg.num_layers):
        name = f"layers.{i}.attn.qkv"
        (p,) = ours.pieces[name]
        got = (x @ p.a.T) @ p.b.T
        want = torch.zeros_like(got)
        for q in reference.pieces[name]:
            want[:, q.row : q.row + q.b.shape[0]] += (x @ q.a.T) @ q.b.T
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert len(reference.pieces["layers.0.attn.qkv"]) == 3 and "layers.0.attn.o" not in ours.pieces


def engine_with(base, adapters):
    tokenizer = Tokenizer.from_dir(base)
    runner = runner_with(base, adapters, tokenizer.vocab_size)
    cfg = sched_config(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=BLOCK)
    return LLMEngine(runner, tokenizer, cfg, BlockPool(64, BLOCK), tokenizer.stop_token_ids, loras=runner.loras)


def run(engine, requests, out: dict | None = None) -> dict:
    """Add the requests, step until idle: {request id: (token ids, prompt tokens read from the prefix cache)},
    added to `out` when given; every KV block free after."""
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    out = {} if out is None else out
    while engine.has_work:
        for o in engine.step():
            tokens, _ = out.get(o.request_id, ([], 0))
            out[o.request_id] = (tokens + o.token_ids, o.num_cached_tokens)
    assert engine.pop_errors() == [] and engine.pool.num_free == engine.pool.num_blocks
    return out


def test_greedy_tokens_with_an_adapter_follow_peft(base, adapters):
    ids = list(range(100, 117))
    engine = engine_with(base, adapters)
    params = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = run(engine, [("lora", ids, SamplingParams(lora="all", **params)), ("base", ids, SamplingParams(**params))])
    references = {"lora": lambda t: peft_logits(base, adapters["all"], t), "base": lambda t: hf_logits(base, t)}
    for rid, reference in references.items():
        tokens = list(ids)
        for _ in range(6):
            tokens.append(int(reference(tokens)[-1, : engine.tokenizer.vocab_size].argmax()))
        assert out[rid][0] == tokens[len(ids):], rid
    assert out["lora"][0] != out["base"][0]


def test_the_prefix_cache_is_kept_apart_per_adapter(base, adapters):
    engine = engine_with(base, adapters)
    ids = list(range(200, 233))  # 8 full blocks and one token
    params = dict(max_tokens=1, temperature=0.0, ignore_eos=True)
    cached = {}
    for rid, lora in (("base", None), ("a1", "all"), ("a2", "all"), ("b1", "attn"), ("base2", None)):
        cached[rid] = run(engine, [(rid, ids, SamplingParams(lora=lora, **params))])[rid][1]
    assert cached == {"base": 0, "a1": 0, "a2": 32, "b1": 0, "base2": 32}


def test_an_unknown_adapter_is_refused(base, adapters):
    engine = engine_with(base, adapters)
    with pytest.raises(ValueError, match="no LoRA adapter 'nope'"):
        engine.add_request("x", [1, 2, 3], SamplingParams(lora="nope"))


@pytest.mark.parametrize("change, error", [
    (lambda c, t: c.update(use_dora=True), "DoRA"),
    (lambda c, t: c.update(bias="all"), "biases"),
    (lambda c, t: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda c, t: c.update(peft_type="IA3"), "not LoRA"),
    (lambda c, t: c.update(alpha_pattern={"down_proj": 1.0}), "alpha_pattern"),
    (lambda c, t: c.update(alora_invocation_tokens=[1, 2]), "activated LoRA"),
    (lambda c, t: c.update(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (lambda c, t: c.update(trainable_token_indices=[5]), "trainable tokens"),
    (lambda c, t: c.update(lora_alpha="16"), "lora_alpha must be a finite number"),
    (lambda c, t: c.update(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    (lambda c, t: c.update(lora_alpha=10**400), "lora_alpha must be a finite number"),  # JSON's ints have no limit
    (lambda c, t: c.update(lora_alpha=1e300), "not finite in torch.float32"),  # B scaled past float32
    (lambda c, t: t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].view(-1)[0].fill_(float("inf")),
     "down_proj has weights that are not finite"),
    (lambda c, t: t.update({k: v[:0] if "lora_A" in k else v[:, :0] for k, v in t.items()}), "has rank 0"),
    (lambda c, t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
                            "base_model.model.lm_head.lora_B.weight": torch.zeros(2048, 2)}), "LoRA on .*lm_head"),
    (lambda c, t: t.pop("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"), "without its pair"),
    (lambda c, t: t.update({"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(4, 3)}),
     "the base weight is"),
])
def test_adapters_it_cannot_run_are_refused(base, adapters, tmp_path, change, error):
    config = json.loads((adapters["all"] / "adapter_config.json").read_text())
    tensors = load_file(adapters["all"] / "adapter_model.safetensors")
    change(config, tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    cfg = load_model(base, dtype="float32").cfg
    with pytest.raises(LoRAError, match=error):
        load_adapter("x", tmp_path, cfg, torch.float32, "cpu")


def test_a_missing_or_broken_adapter_is_named(base, adapters, tmp_path):
    cfg = load_model(base, dtype="float32").cfg
    with pytest.raises(LoRAError, match="cannot read"):
        load_adapter("x", tmp_path / "nowhere", cfg, torch.float32, "cpu")
    with pytest.raises(LoRAError, match="cannot read"):  # expanduser raises RuntimeError for an unknown user
        load_adapter("x", "~no-such-user-here/x", cfg, torch.float32, "cpu")
    (tmp_path / "adapter_config.json").write_text("[]")
    weights = (adapters["all"] / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(LoRAError, match="not a JSON object"):
        load_adapter("x", tmp_path, cfg, torch.float32, "cpu")
    (tmp_path / "adapter_config.json").write_text((adapters["all"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(weights[:3000])  # a cut download
    with pytest.raises(LoRAError, match="cannot read"):
        load_adapter("x", tmp_path, cfg, torch.float32, "cpu")


@pytest.fixture(scope="module")
def server(base, adapters):
    from tests.server_proc import ServerProcess

    s = ServerProcess(base, "--served-model-name", "glm4-test", "--lora-modules",
                      *(f"{name}={path}" for name, path in adapters.items())).wait_healthy()
    yield s
    s.stop()


def test_the_server_serves_an_adapter_by_its_model_name(server, base, adapters):
    """Through the OpenAI SDK: /v1/models lists the adapters, a request naming one gets PEFT's greedy
    tokens and names it as its model, the base model's name gets the base model's."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == ["all", "attn", "glm4-test"]
    assert models["all"].model_extra["parent"] == "glm4-test"
    assert models["all"].model_extra["root"] == str(adapters["all"])
    assert client.models.retrieve("attn").id == "attn"
    ids = list(range(300, 313))
    vocab = Tokenizer.from_dir(base).vocab_size
    for model, reference in (("all", lambda t: peft_logits(base, adapters["all"], t)),
                             ("glm4-test", lambda t: hf_logits(base, t))):
        reply = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        assert reply.model == model
        got = [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]
        tokens = list(ids)
        for _ in range(4):
            tokens.append(int(reference(tokens)[-1, :vocab].argmax()))
        assert got == tokens[len(ids):], model
    chat = client.chat.completions.create(model="attn", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == "attn"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["all"])})
    assert r.status_code == 404 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]


def test_lora_modules_are_read_as_vllm_writes_them():
    from glm4serve.engine.config import parse_lora_modules

    want = {"sql": "/a", "chat": "/b"}
    assert parse_lora_modules(["sql=/a", "chat=/b"]) == want  # --lora-modules sql=/a chat=/b
    assert parse_lora_modules("sql=/a,chat=/b") == want == parse_lora_modules("sql=/a chat=/b")  # env
    assert parse_lora_modules('{"sql": "/a", "chat": "/b"}') == want == parse_lora_modules(want)  # JSON, YAML
    assert parse_lora_modules(['{"name": "sql", "path": "/a"}', "chat=/b"]) == want  # vLLM's JSON items
    for bad, error in ((["sql"], "name=path"), (["a=/x", "a=/y"], "given twice"), ([{"name": "a"}], "a path"),
                       (["=/x"], "needs a name"), ({"": "/x"}, "needs a name"),
                       ('[{"name": "", "path": "/a"}]', "needs a name")):
        with pytest.raises(ValueError, match=error):
            parse_lora_modules(bad)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_models_take_adapters(base, adapters, quantization):
    """The adapter adds to a quantized product: the logits move by about what PEFT's adapter moves them."""
    ids = list(range(50, 61))
    model = load_model(base, dtype="bfloat16", quantization=quantization)
    runner = make_runner(model, 64, BLOCK, loras=load_loras({"all": str(adapters["all"])}, model))
    blocks = list(range(-(-len(ids) // BLOCK)))
    ours = {lora: runner.execute(ScheduledBatch([SeqChunk(ids, 0, blocks, lora=lora)]))[0] for lora in (None, "all")}
    theirs = peft_logits(base, adapters["all"], ids)[-1] - hf_logits(base, ids)[-1]
    moved = ours["all"] - ours[None]
    assert torch.nn.functional.cosine_similarity(moved, theirs, dim=0) > 0.95


def test_the_replicas_router_keys_prompts_as_the_engine_does():
    """Ray's prefix-affinity router sends a prompt where its blocks are cached: its hashes must be the
    engine's, an adapter's and a cache salt's included."""
    from glm4serve.cluster import prompt_block_hashes
    from glm4serve.engine.sequence import Sequence

    ids = list(range(40))
    keys = [(lora, salt) for lora in (None, "all", "attn") for salt in (None, "s")]
    for lora, salt in keys:
        seq = Sequence(0, "r", 0, ids, SamplingParams(lora=lora, cache_salt=salt), lora=lora)
        assert prompt_block_hashes(ids, 8, lora, salt) == seq.block_hashes(8, 5)
    assert len({prompt_block_hashes(ids, 8, lora, salt)[0] for lora, salt in keys}) == 6


def test_a_served_model_name_an_adapter_also_has_is_refused():
    from glm4serve.api.settings import ServerSettings

    with pytest.raises(ValueError, match="named 'm', as the served model"):
        ServerSettings(model="/data/m", lora_modules={"m": "/a"})
    with pytest.raises(ValueError, match="named 'x', as the served model"):
        ServerSettings(served_model_name="x", lora_modules=["x=/a"])
    assert ServerSettings(model="/data/m", lora_modules={"n": "/a"}).model_name == "m"


def test_the_peft_default_alpha_applies_when_the_config_leaves_it_out(base, adapters, tmp_path):
    from peft import LoraConfig

    from glm4serve.model.lora import PEFT_DEFAULT_ALPHA

    assert LoraConfig().lora_alpha == PEFT_DEFAULT_ALPHA
    config = json.loads((adapters["all"] / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((adapters["all"] / "adapter_model.safetensors").read_bytes())
    cfg = load_model(base, dtype="float32").cfg
    ours = load_adapter("x", tmp_path, cfg, torch.float32, "cpu").pieces["layers.0.mlp.down"][0]
    raw = load_file(adapters["all"] / "adapter_model.safetensors")
    raw = raw["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(ours.b, raw * PEFT_DEFAULT_ALPHA / config["r"])


def test_a_bad_adapter_stops_the_replicated_server_in_one_line_before_ray_starts(base):
    from glm4serve import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--num-replicas", "2", "--model", str(base), "--lora-modules", "x=/nowhere"])
    assert str(exc.value.code).startswith("glm4serve: cannot serve: LoRA adapter 'x': cannot read /nowhere/")


def test_a_fixed_set_refuses_loads_and_only_a_fixed_set_goes_in_slots(base, adapters):
    model = load_model(base, dtype="float32")
    fixed = load_loras({"all": str(adapters["all"])}, model, runtime=False)
    fixed.attach(model)
    with pytest.raises(LoRAError, match="fixed"):
        fixed.load("attn", "attn", str(adapters["attn"]))
    changing = load_loras({"all": str(adapters["all"])}, load_model(base, dtype="float32"))
    with pytest.raises(ValueError, match="fixed set"):
        changing.attach(model, slotted=True)
