"""configs/*.yaml: each loads through ServerSettings (the YAML source the CLI uses), spells out the
settings a deployment must think about, and its KV budget holds its max_model_len."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from glm4serve.api.settings import ServerSettings
from glm4serve.engine.config import plan_kv_cache
from glm4serve.model.config import ModelConfig
from glm4serve.model.loader import param_shapes
from glm4serve.model.kv_cache import bytes_per_token
from glm4serve.model.shard import Shard

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
from shared_models import GLM4_CHAT_DIR as SHARED_CHAT
MUST_SPELL_OUT = ("model", "dtype", "max_model_len", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                  "max_waiting_requests", "request_timeout_seconds", "graceful_shutdown_seconds")
KIB = 1024


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("GLM4SERVE_"):
            monkeypatch.delenv(key)


def load(name: str) -> ServerSettings:
    return ServerSettings(config=str(REPO / "configs" / name))


def test_the_four_deployments_have_a_config():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "glm-4-9b-chat.yaml", "glm-4-9b-chat-1m.yaml",
                                        "glm-4-9b-0414.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_spells_out_what_matters(path):
    raw = yaml.safe_load(path.read_text())
    missing = [k for k in MUST_SPELL_OUT if k not in raw]
    assert not missing, f"{path.name} leaves {missing} to the defaults"
    s = ServerSettings(config=str(path))  # extra="forbid": a misspelled key fails here
    assert s.max_model_len is not None and s.kv_cache_memory is not None
    assert s.max_num_batched_tokens >= s.block_size and s.max_num_seqs >= 1
    assert s.max_request_body_bytes >= 1024**2
    # every key also parses in its own right (no silent fall-back to a default)
    for key, value in raw.items():
        if value is not None and key not in ("kv_cache_memory", "max_request_body_bytes"):
            got = getattr(s, key)
            assert (got.model_dump() if hasattr(got, "model_dump") else got) == value, key


def test_real_model_configs_are_bfloat16_with_a_named_model():
    for name in ("glm-4-9b-chat.yaml", "glm-4-9b-chat-1m.yaml", "glm-4-9b-0414.yaml", "glm-4-32b-0414.yaml",
                 "glm-4-9b-chat-cpu.yaml"):
        s = load(name)
        assert s.dtype == "bfloat16" and s.model and s.served_model_name, name
    assert load("demo.yaml").model is None


def kv_bytes_per_token(cfg: ModelConfig, shard: Shard = Shard()) -> int:
    return bytes_per_token(cfg, torch.bfloat16, shard)


def check_budget(s: ServerSettings, cfg: ModelConfig) -> None:
    # the plan server.build_llm_engine makes (per rank under tensor parallelism): it refuses a
    # max_model_len the budget cannot hold
    shard = Shard(0, s.tensor_parallel_size)
    shard.check(cfg)  # the model splits into that many parts
    plan = plan_kv_cache(s.engine_args(), cfg.max_position_embeddings, kv_bytes_per_token(cfg, shard), "cuda")
    assert plan.max_model_len == s.max_model_len <= cfg.max_position_embeddings


@pytest.fixture(scope="module")
def chat_config_dict() -> dict:
    if not (SHARED_CHAT / "config.json").is_file():
        pytest.skip(f"{SHARED_CHAT} is absent")
    return json.loads((SHARED_CHAT / "config.json").read_text())


def test_glm_4_9b_chat_budget_holds_its_context(chat_config_dict):
    cfg = ModelConfig.from_dir(SHARED_CHAT)
    assert kv_bytes_per_token(cfg) == 40 * KIB
    s = load("glm-4-9b-chat.yaml")
    assert s.max_model_len == cfg.max_position_embeddings == 131072
    check_budget(s, cfg)


def test_glm_4_9b_chat_on_a_cpu_fits_a_24_gb_box(chat_config_dict):
    """int8 linears (a byte a weight) and the bf16 embedding, plus the KV budget, leave a 24 GB box room
    for activations and the OS; the budget holds the context."""
    cfg = ModelConfig.from_dir(SHARED_CHAT)
    s = load("glm-4-9b-chat-cpu.yaml")
    assert (s.device, s.quantization) == ("cpu", "int8") and s.speculative_config.method == "ngram"
    shapes = param_shapes(cfg)
    embedding = math.prod(next(shape for name, shape in shapes.items() if "embed" in name))
    weights = sum(math.prod(shape) for shape in shapes.values()) + embedding  # int8 + the bf16 embedding
    assert weights + s.kv_cache_memory < 16e9
    check_budget(s, cfg)


def test_glm_4_9b_chat_1m_budget_holds_its_context(chat_config_dict):
    # The 1M model is the chat model with 4 KV groups and a 1M context (GLM4.md, section 1).
    d = dict(chat_config_dict, multi_query_group_num=4, seq_length=1048576, rope_ratio=10000)
    cfg = ModelConfig.from_dict(d)
    assert kv_bytes_per_token(cfg) == 80 * KIB
    check_budget(load("glm-4-9b-chat-1m.yaml"), cfg)


def test_glm_4_9b_0414_budget_holds_its_context():
    # GLM-4-9B-0414's published config.json (the fields that size the KV cache and the context)
    cfg = ModelConfig.from_dict({
        "model_type": "glm4", "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05, "attention_bias": True,
    })
    assert kv_bytes_per_token(cfg) == 40 * KIB
    s = load("glm-4-9b-0414.yaml")
    assert s.max_model_len == 32768  # no YaRN: not beyond the trained context
    check_budget(s, cfg)


# GLM-4-32B-0414's published config.json: the fields that shape the model, its KV cache and context
GLM_4_32B_0414 = {
    "model_type": "glm4", "hidden_size": 6144, "intermediate_size": 23040, "num_hidden_layers": 61,
    "num_attention_heads": 48, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552,
    "max_position_embeddings": 32768, "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
    "attention_bias": True,
}


def test_glm_4_32b_0414_splits_over_two_gpus_and_its_budget_holds_its_context():
    cfg = ModelConfig.from_dict(GLM_4_32B_0414)
    params = sum(math.prod(shape) for shape in param_shapes(cfg).values())
    assert 32.0e9 < params < 33.0e9 and cfg.variant == "glm4"  # "32B": 2 bytes each is ~65 GB in bf16
    s = load("glm-4-32b-0414.yaml")
    assert s.tensor_parallel_size == 2 and s.max_model_len == 32768
    two = Shard(0, 2)
    assert two.heads(cfg) == 24 and two.kv_heads(cfg) == 1  # each GPU: half the heads, one of the 2 KV heads
    assert kv_bytes_per_token(cfg, two) == 61 * 2 * 128 * 2 * 1  # 30.5 KiB per token per GPU
    per_gpu = sum(math.prod(two.local_shape(n, shape, cfg)) for n, shape in param_shapes(cfg).items()) * 2
    assert per_gpu + s.kv_cache_memory < 80e9 * 0.95  # fits an 80 GB card with room for activations
    check_budget(s, cfg)
