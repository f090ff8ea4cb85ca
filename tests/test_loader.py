"""Checkpoint loading (glm4serve.model.loader) and the random checkpoints it is tested with.

The model loaded into is a bare nn.Module with exactly GLM4Model's parameter names, built on the
meta device and then `to_empty` (garbage memory) the way the real model builder does, so every
test also checks that the loader fills every parameter. Independent of glm4.py on purpose.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm4serve.model.config import ConfigError, ModelConfig
from glm4serve.model.loader import (
    CheckpointError,
    checkpoint_tensors,
    load_weights,
    param_shapes,
)
from glm4serve.model.random_checkpoint import make_model_main, special_token_ids, write_random_checkpoint

from shared_models import SHARED_MODELS
# Distinct sizes everywhere (q 64 rows, k and v 32 each, F != H) so a mix-up shows as a shape error.
SMALL = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, num_merges=300)


def build_model(cfg: ModelConfig, dtype=torch.float32, extra: dict | None = None) -> torch.nn.Module:
    """An nn.Module whose parameters are named like GLM4Model's, on meta then to_empty (uninitialised)."""
    shapes = dict(param_shapes(cfg), **(extra or {}))
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")))
    return root.to_empty(device="cpu")


def load(path: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    cfg = ModelConfig.from_dir(path)
    model = build_model(cfg, dtype)
    load_weights(model, path, cfg, dtype, "cpu")
    return {k: v.detach() for k, v in model.state_dict().items()}


CHECKPOINTS = {  # name -> write_random_checkpoint arguments; all seed 0, same sizes
    "hf_4x": dict(layout="hf", config_style="4.x"),
    "hf_5x": dict(layout="hf", config_style="5.x"),
    "hf_sharded": dict(layout="hf", shards=3),
    "chatglm": dict(layout="chatglm"),
    "chatglm_sharded": dict(layout="chatglm", shards=2),
    "glm4_hf": dict(variant="glm4", layout="hf", config_style="5.x"),
    "hf_bf16": dict(layout="hf", dtype="bfloat16"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {name: write_random_checkpoint(root / name, seed=0, **SMALL, **kw) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def reference(ckpts) -> dict[str, torch.Tensor]:
    return load(ckpts["hf_4x"])


def copy_ckpt(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


# ---------------------------------------------------------------- same weights in every layout


@pytest.mark.parametrize("name", ["hf_5x", "hf_sharded", "chatglm", "chatglm_sharded"])
def test_every_layout_loads_the_same_weights(ckpts, reference, name):
    got = load(ckpts[name])
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_glm4_variant_has_glm_weights_plus_two_norms(ckpts, reference):
    got = load(ckpts["glm4_hf"])
    extra = set(got) - set(reference)
    assert extra == {f"layers.{i}.{n}.weight" for i in range(2) for n in ("post_attn_norm", "post_mlp_norm")}
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_weights_look_like_a_model(reference, tmp_path):
    w = reference
    for k, v in w.items():
        assert torch.isfinite(v).all(), k
        if k.endswith("norm.weight"):  # around 1, yet not 1: a swapped norm must change the output
            assert abs(v.mean().item() - 1) < 0.1 and v.std().item() > 0.03, k
        else:
            assert v.std().item() > 0.005, k
    # The rows of the fused qkv differ (q, k, v are not copies of one another) and layers differ.
    qkv = w["layers.0.attn.qkv.weight"]
    assert not torch.equal(qkv[64:96], qkv[96:128])
    assert not torch.equal(w["layers.0.mlp_norm.weight"], w["layers.1.mlp_norm.weight"])
    assert not torch.equal(w["layers.0.input_norm.weight"], w["layers.0.mlp_norm.weight"])
    other = load(write_random_checkpoint(tmp_path / "seed1", seed=1, **SMALL))
    assert not torch.equal(other["lm_head.weight"], w["lm_head.weight"])


def test_mapping_of_names_checked_by_hand(ckpts, reference):
    """The table in loader.py against names written out here independently of it."""
    hf = load_file(ckpts["hf_4x"] / "model.safetensors")
    w = reference
    assert torch.equal(w["embed.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(w["layers.1.attn.qkv.weight"][:64], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(w["layers.1.attn.qkv.weight"][64:96], hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(w["layers.1.attn.qkv.weight"][96:], hf["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(w["layers.1.attn.qkv.bias"][96:], hf["model.layers.1.self_attn.v_proj.bias"])
    assert torch.equal(w["layers.1.mlp_norm.weight"], hf["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(w["layers.1.input_norm.weight"], hf["model.layers.1.input_layernorm.weight"])
    assert torch.equal(w["norm.weight"], hf["model.norm.weight"])
    assert torch.equal(w["lm_head.weight"], hf["lm_head.weight"])

    cg = load_file(ckpts["chatglm"] / "model.safetensors")
    p = "transformer.encoder.layers.1."
    assert torch.equal(cg[p + "self_attention.query_key_value.weight"], w["layers.1.attn.qkv.weight"])
    assert torch.equal(cg[p + "self_attention.dense.weight"], w["layers.1.attn.o.weight"])
    assert torch.equal(cg[p + "post_attention_layernorm.weight"], w["layers.1.mlp_norm.weight"])
    assert torch.equal(cg[p + "mlp.dense_h_to_4h.weight"], w["layers.1.mlp.gate_up.weight"])
    assert torch.equal(cg["transformer.output_layer.weight"], w["lm_head.weight"])
    assert cg["transformer.rotary_pos_emb.inv_freq"].shape == (4,)  # RotaryEmbedding(head_dim // 2)

    g4 = load_file(ckpts["glm4_hf"] / "model.safetensors")
    w4 = load(ckpts["glm4_hf"])
    assert torch.equal(w4["layers.0.post_attn_norm.weight"], g4["model.layers.0.post_self_attn_layernorm.weight"])
    assert torch.equal(w4["layers.0.post_mlp_norm.weight"], g4["model.layers.0.post_mlp_layernorm.weight"])


def test_configs_are_written_in_the_real_styles(ckpts):
    cg = json.loads((ckpts["chatglm"] / "config.json").read_text())
    assert cg["model_type"] == "chatglm" and cg["padded_vocab_size"] % 64 == 0
    assert (cg["ffn_hidden_size"], cg["num_layers"], cg["kv_channels"], cg["multi_query_group_num"]) == (96, 2, 16, 2)
    h4 = json.loads((ckpts["hf_4x"] / "config.json").read_text())
    assert h4["architectures"] == ["GlmForCausalLM"] and h4["rope_theta"] == 5e6 and "rope_parameters" not in h4
    h5 = json.loads((ckpts["glm4_hf"] / "config.json").read_text())
    assert h5["architectures"] == ["Glm4ForCausalLM"] and "rope_theta" not in h5
    assert h5["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}

    special = special_token_ids(ckpts["chatglm"])
    stops = [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
    assert len(set(stops)) == 3 and max(stops) < cg["padded_vocab_size"]
    gen = json.loads((ckpts["chatglm"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stops == cg["eos_token_id"] == h4["eos_token_id"]
    assert (gen["temperature"], gen["top_p"]) == (0.8, 0.8)
    assert ModelConfig.from_dir(ckpts["chatglm"]).eos_token_ids == tuple(stops)


def test_rope_theta_round_trips_through_every_config_style(tmp_path):
    for layout, style in [("chatglm", "4.x"), ("hf", "4.x"), ("hf", "5.x")]:
        d = write_random_checkpoint(tmp_path / f"{layout}{style}", layout=layout, config_style=style,
                                    rope_theta=5e6, max_position_embeddings=4096, **SMALL)  # fmt: skip
        cfg = ModelConfig.from_dir(d)
        assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.head_dim) == (5e6, 4096, 16), (layout, style)
    assert json.loads((tmp_path / "chatglm4.x" / "config.json").read_text())["rope_ratio"] == 500


def test_shards_and_index(ckpts):
    d = ckpts["hf_sharded"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (d / "model.safetensors").exists()
    total = 0
    for f in files:
        with safe_open(d / f, framework="pt") as sf:
            names = set(sf.keys())
            assert names == {n for n, nf in index["weight_map"].items() if nf == f}
            total += sum(sf.get_tensor(n).numel() * 4 for n in names)
    assert index["metadata"]["total_size"] == total
    cfg = ModelConfig.from_dir(d)
    assert set(index["weight_map"]) == set(checkpoint_tensors(cfg))


# ---------------------------------------------------------------- dtype


def test_load_casts_to_bfloat16(ckpts, reference):
    got = load(ckpts["hf_4x"], dtype=torch.bfloat16)
    for k, v in reference.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], v.to(torch.bfloat16)), k


def test_bfloat16_checkpoint_loads_into_float32(ckpts, reference):
    with safe_open(ckpts["hf_bf16"] / "model.safetensors", framework="pt") as sf:
        assert sf.get_tensor("lm_head.weight").dtype == torch.bfloat16
    got = load(ckpts["hf_bf16"])
    for k, v in reference.items():
        assert torch.equal(got[k], v.to(torch.bfloat16).float()), k


def test_model_in_another_dtype_than_asked_is_refused(ckpts):
    cfg = ModelConfig.from_dir(ckpts["hf_4x"])
    with pytest.raises(ValueError, match="is torch.float32, asked to load as torch.bfloat16"):
        load_weights(build_model(cfg), ckpts["hf_4x"], cfg, torch.bfloat16, "cpu")


# ---------------------------------------------------------------- transformers reads our HF files


@pytest.mark.parametrize("name", ["hf_4x", "hf_5x", "hf_sharded", "glm4_hf"])
def test_transformers_loads_hf_checkpoints(ckpts, reference, name):
    transformers = pytest.importorskip("transformers")
    cls = transformers.Glm4ForCausalLM if name == "glm4_hf" else transformers.GlmForCausalLM
    for loader in (cls, transformers.AutoModelForCausalLM):
        model, info = loader.from_pretrained(ckpts[name], output_loading_info=True, dtype=torch.float32)
        assert type(model) is cls
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert not info["error_msgs"], info
    sd = model.state_dict()
    ours = load(ckpts[name])
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"], ours["layers.1.attn.qkv.weight"][64:96])
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.bias"], ours["layers.0.attn.qkv.bias"][:64])
    assert torch.equal(sd["model.layers.1.post_attention_layernorm.weight"], ours["layers.1.mlp_norm.weight"])
    assert torch.equal(sd["lm_head.weight"], reference["lm_head.weight"])
    assert model.config.rope_parameters["rope_theta"] == 5e6
    assert model.config.eos_token_id == list(ModelConfig.from_dir(ckpts[name]).eos_token_ids)
    if name == "glm4_hf":
        assert torch.equal(sd["model.layers.1.post_mlp_layernorm.weight"], ours["layers.1.post_mlp_norm.weight"])


# ---------------------------------------------------------------- errors


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _load_error(path: Path, exc=CheckpointError) -> str:
    cfg = ModelConfig.from_dir(path)
    with pytest.raises(exc) as e:
        load_weights(build_model(cfg), path, cfg, torch.float32, "cpu")
    return str(e.value)


def test_missing_tensor_single_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    _rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    msg = _load_error(d)
    assert "missing tensor model.layers.1.self_attn.k_proj.bias" in msg and "model.safetensors" in msg


def test_missing_tensor_in_shard_named_by_index(ckpts, tmp_path):
    d = copy_ckpt(ckpts["chatglm_sharded"], tmp_path)
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    _rewrite(d / shard, lambda t: t.pop(name))
    assert _load_error(d) == f"missing tensor {name} (expected in {shard} per index)"


def test_missing_tensor_not_in_index(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_sharded"], tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _load_error(d)
    assert "missing tensor model.norm.weight" in msg and "model.safetensors.index.json" in msg


def test_unexpected_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    _rewrite(d / "model.safetensors", lambda t: t.update({"foo.bar": torch.zeros(3)}))
    assert _load_error(d).startswith("unexpected tensor foo.bar in model.safetensors")


def test_rotary_inv_freq_buffers_are_ignored(ckpts, reference, tmp_path):
    # older transformers saved each layer's rotary buffer; transformers recomputes it, and so do we
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    _rewrite(d / "model.safetensors", lambda t: t.update(buffer))
    assert load(d).keys() == reference.keys()


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_a_cut_safetensors_file_is_named(ckpts, tmp_path, cut):
    d = copy_ckpt(ckpts["hf_sharded"], tmp_path)
    f = d / "model-00003-of-00003.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(int(size * cut) if isinstance(cut, float) else (cut and size - cut))
    msg = _load_error(d)
    assert msg.startswith(f"{f} is truncated or not a safetensors file (")


def test_glm4_norms_in_a_glm_checkpoint_are_unexpected(ckpts, tmp_path):
    d = copy_ckpt(ckpts["glm4_hf"], tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="glm", architectures=["GlmForCausalLM"])
    (d / "config.json").write_text(json.dumps(config))
    assert "unexpected tensor model.layers.0.post_" in _load_error(d)


def test_wrong_shape(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    _rewrite(d / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 95)}))
    msg = _load_error(d)
    assert msg == "tensor model.layers.0.mlp.down_proj.weight in model.safetensors has shape (64, 95), expected (64, 96)"


def test_missing_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_sharded"], tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    assert "index names shard model-00002-of-00003.safetensors which does not exist" in _load_error(d)


def test_no_safetensors(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    (d / "model.safetensors").unlink()
    assert _load_error(d) == f"no safetensors files in {d}"


def test_config_errors(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(d)
    cfg = ModelConfig.from_dir(ckpts["hf_4x"])
    with pytest.raises(ConfigError, match="unknown checkpoint layout 'onnx'"):
        ModelConfig(**{**cfg.__dict__, "layout": "onnx"})


def test_a_checkpoint_stored_quantized_is_refused_by_name(ckpts, tmp_path):
    """AWQ/GPTQ checkpoints (transformers' quantization_config) and chatglm's int4 ones (quantization_bit) would
    otherwise fail on their tensors' names or shapes."""
    d = copy_ckpt(ckpts["glm4_hf"], tmp_path)
    config = json.loads((d / "config.json").read_text())
    for extra, name in (({"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq"),
                        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "gptq"),
                        ({"quantization_bit": 4}, "chatglm int4")):
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        with pytest.raises(ConfigError, match=f"stored quantized \\({name}\\).*--quantization int8 or int4"):
            ModelConfig.from_dir(d)
    (d / "config.json").write_text(json.dumps({**config, "quantization_bit": 0}))  # chatglm's "not quantized"
    assert ModelConfig.from_dir(d).num_layers == ModelConfig.from_dir(ckpts["glm4_hf"]).num_layers


def test_rope_scaling_but_yarn_is_refused_under_either_key_and_missing_keys_take_transformers_defaults(ckpts,
                                                                                                      tmp_path):
    d = copy_ckpt(ckpts["glm4_hf"], tmp_path)
    config = json.loads((d / "config.json").read_text())
    for scaling in [{"type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0}]:
        (d / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
        with pytest.raises(ConfigError, match="rope type '(linear|dynamic)' is not supported"):
            ModelConfig.from_dir(d)
    # GLM-4-0414's model card's YaRN: 4x the trained 32K, transformers' attention factor (0.1 ln 4 + 1)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768, "rope_scaling": yarn}))
    cfg = ModelConfig.from_dir(d)
    assert cfg.max_position_embeddings == 131072 and cfg.yarn.original_max_positions == 32768
    assert cfg.yarn.attention_factor == pytest.approx(1 + 0.1 * math.log(4))
    # a chatglm config's RoPE is rope_ratio: a scaling there (by --hf-overrides, say) is refused, not ignored
    chatglm = json.loads((ckpts["chatglm"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="rope_ratio"):
        ModelConfig.from_dict({**chatglm, "rope_scaling": yarn})
    bare = {k: v for k, v in config.items() if k not in ("num_key_value_heads", "head_dim", "rms_norm_eps")}
    (d / "config.json").write_text(json.dumps(bare))
    from transformers import AutoConfig

    theirs, ours = AutoConfig.from_pretrained(d), ModelConfig.from_dir(d)
    assert (ours.num_kv_heads, ours.head_dim, ours.rms_norm_eps) == (
        theirs.num_key_value_heads, theirs.head_dim, theirs.rms_norm_eps)


def test_model_that_does_not_match_the_config(ckpts):
    path = ckpts["hf_4x"]
    cfg = ModelConfig.from_dir(path)
    with pytest.raises(ValueError, match=r"has extra \['extra.weight'\]"):
        load_weights(build_model(cfg, extra={"extra.weight": (3,)}), path, cfg, torch.float32, "cpu")
    meta = build_model(cfg).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        load_weights(meta, path, cfg, torch.float32, "cpu")


def test_chatglm_layout_has_no_glm4_variant(tmp_path):
    with pytest.raises(ValueError, match="chatglm layout"):
        write_random_checkpoint(tmp_path / "x", variant="glm4", layout="chatglm", **SMALL)
    cfg = ModelConfig(variant="glm4", layout="chatglm", vocab_size=64, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4)  # fmt: skip
    with pytest.raises(CheckpointError, match="chatglm layout"):
        checkpoint_tensors(cfg)


def test_vocab_smaller_than_tokenizer_is_refused(ckpts, tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_random_checkpoint(tmp_path / "x", vocab_size=64, **SMALL)
    # nor served: a checkpoint cut to fewer rows than its tokenizer has ids
    from glm4serve.engine.config import EngineArgs
    from glm4serve.server import build_llm_engine

    d = copy_ckpt(ckpts["hf_4x"], tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    _rewrite(d / "model.safetensors",
             lambda t: t.update({k: t[k][:256].clone() for k in t if "embed" in k or "lm_head" in k}))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ token ids but the model's vocabulary only 256"):
        build_llm_engine(EngineArgs(model=str(d), kv_cache_memory=1 << 20))


# ---------------------------------------------------------------- real GLM-4 files (no weights)


@pytest.mark.parametrize("name", ["glm-4-9b-chat", "glm-4-9b-chat-1m", "glm-4-9b"])
def test_expected_names_match_the_real_index(name):
    d = SHARED_MODELS / name
    if not (d / "model.safetensors.index.json").is_file():
        pytest.skip(f"{d} not present")
    cfg = ModelConfig.from_dir(d)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    expected = checkpoint_tensors(cfg)
    assert set(weight_map) - set(expected) == {"transformer.rotary_pos_emb.inv_freq"}
    assert set(expected) <= set(weight_map)
    qkv = expected["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == ((32 + 2 * cfg.num_kv_heads) * 128, 4096)
    assert expected["transformer.output_layer.weight"].shape == (151552, 4096)
    total = sum(t.numel() for t in (torch.empty(s, device="meta") for s in param_shapes(cfg).values()))
    if name == "glm-4-9b-chat":
        assert total == 9_399_951_360  # GLM4.md: the published parameter count
        with pytest.raises(CheckpointError, match="index names shard model-00001-of-00010.safetensors"):
            load_weights(torch.nn.Module(), d, cfg)


# ---------------------------------------------------------------- CLI


def test_make_model_cli(tmp_path, capsys):
    out = tmp_path / "m"
    argv = [str(out), "--variant", "glm4", "--config-style", "5.x", "--shards", "2", "--hidden-size", "32",
            "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--intermediate-size", "48", "--layers", "3",
            "--vocab-size", "4096", "--dtype", "bfloat16", "--seed", "7"]  # fmt: skip
    assert make_model_main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = ModelConfig.from_dir(out)
    assert (cfg.variant, cfg.layout, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "glm4", "hf", 32, 2, 1, 8)  # fmt: skip
    assert (cfg.intermediate_size, cfg.num_layers, cfg.vocab_size, cfg.torch_dtype) == (48, 3, 4096, "bfloat16")
    got = load(out, dtype=torch.bfloat16)
    assert got["layers.2.attn.qkv.weight"].shape == (32, 32)
    assert (out / "model.safetensors.index.json").is_file()

    assert make_model_main([str(tmp_path / "bad"), "--variant", "glm4", "--layout", "chatglm"]) == 1
    assert "chatglm layout" in capsys.readouterr().err


def test_make_model_with_its_defaults_is_read_without_the_hf_conversion_warning(tmp_path, caplog):
    """A default checkpoint has GLM-4's 128K context, so its RoPE base is the chat model's trained one: not the
    published -hf config's 10000, which loading warns of."""
    assert make_model_main([str(tmp_path / "m")]) == 0
    with caplog.at_level(logging.WARNING, logger="glm4serve.model"):
        cfg = ModelConfig.from_dir(tmp_path / "m")
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (5e6, 131072)
    assert "conversion bug" not in caplog.text


def test_the_hf_conversions_rope_theta_is_warned_of_with_the_override_that_fixes_it(ckpts, tmp_path, caplog):
    """glm-4-9b-chat-hf's published config says rope_theta 10000 (a conversion bug; trained at 5e6): served as it
    says, as transformers runs it, with a warning naming the --hf-overrides that fixes it, which does."""
    config = json.loads((ckpts["hf_4x"] / "config.json").read_text())
    published = {**config, "model_type": "glm", "rope_theta": 10000.0, "max_position_embeddings": 131072}
    with caplog.at_level("WARNING", logger="glm4serve.model"):
        cfg = ModelConfig.from_dict(published)
    assert cfg.rope_theta == 10000.0
    [record] = caplog.records
    fix = json.loads(record.getMessage().split("--hf-overrides ")[1].strip("'"))
    assert fix == {"rope_theta": 5e6}
    caplog.clear()
    with caplog.at_level("WARNING", logger="glm4serve.model"):
        assert ModelConfig.from_dict({**published, **fix}).rope_theta == 5e6
        # transformers 5.x's keys: the override replaces rope_parameters whole
        five = {**published, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5}}
        ModelConfig.from_dict(five)
        fix = json.loads(caplog.records[-1].getMessage().split("--hf-overrides ")[1].strip("'"))
        assert ModelConfig.from_dict({**five, **fix}).rope_theta == 5e6
        # the base model's 8K context at 10000 is as trained: no warning
        caplog.clear()
        ModelConfig.from_dict({**published, "max_position_embeddings": 8192})
    assert len(caplog.records) == 0
