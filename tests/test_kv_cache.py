"""The KV cache's tensors and how many blocks a budget buys."""

import pytest
import torch

from glm4serve.engine.config import EngineArgs, plan_kv_cache
from glm4serve.model.config import ModelConfig
from glm4serve.model.kv_cache import KVCache, bytes_per_token


def tiny_cfg(**kw):
    d = dict(variant="glm", layout="hf", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4)
    d.update(kw)
    return ModelConfig(**d)


def test_the_cache_is_sized_from_a_memory_budget():
    cfg = tiny_cfg()
    per_token = bytes_per_token(cfg, torch.bfloat16)
    assert per_token == 2 * 2 * 2 * 16 * 2  # k+v, layers, kv heads, head dim, bytes
    per_block = 16 * per_token
    plan = plan_kv_cache(EngineArgs(model="m", block_size=16, kv_cache_memory=10 * per_block + 1), 4096, per_token,
                         "cpu")
    assert plan.num_blocks == 10 and plan.max_model_len == 160
    kv = KVCache(cfg, plan.num_blocks, 16, torch.bfloat16)
    assert kv.nbytes == 10 * per_block
    assert plan_kv_cache(EngineArgs(num_kv_blocks=3), 4096, per_token, "cpu").num_blocks == 3
    with pytest.raises(ValueError):
        plan_kv_cache(EngineArgs(kv_cache_memory=per_block - 1), 4096, per_token, "cpu")


def test_copy_blocks_copies_every_layer():
    kv = KVCache(tiny_cfg(), 4, 2, torch.float32)
    for i, t in enumerate(kv.k + kv.v):
        t[1].fill_(i + 1)
    kv.copy_blocks([(1, 3)])
    assert all(torch.equal(t[3], t[1]) and t[1].eq(i + 1).all() for i, t in enumerate(kv.k + kv.v))
    assert all(t[0].eq(0).all() and t[2].eq(0).all() for t in kv.k + kv.v)


def test_glm_4_9b_chat_kv_bytes_per_token(real_chat_dir):
    cfg = ModelConfig.from_dir(real_chat_dir)
    # GLM4.md: 40 layers x 2 x 2 heads x 128 x 2 bytes = 40 KiB per token in bf16
    assert bytes_per_token(cfg, torch.bfloat16) == 40 * 1024
    assert cfg.rope_theta == 5e6 and cfg.rotary_dim == 64 and cfg.max_position_embeddings == 131072
    assert cfg.eos_token_ids == (151329, 151336, 151338)
