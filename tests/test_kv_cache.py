import pytest
import torch

from glm4serve.model.config import ModelConfig
from glm4serve.model.kv_cache import BlockPool, KVCache, KVCacheConfig, NoFreeBlocks, bytes_per_block, num_blocks_for


def tiny_cfg(**kw):
    d = dict(variant="glm", layout="hf", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4)
    d.update(kw)
    return ModelConfig(**d)


def test_allocate_and_free_return_every_block():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0 and pool.usage == 1.0
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    pool.free(b)
    assert pool.num_free == 8 and pool.num_used == 0


def test_shared_blocks_come_back_only_after_last_reference():
    pool = BlockPool(4, 16)
    blocks = pool.allocate(2)
    pool.share(blocks)
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    pool.free(blocks)
    assert pool.num_free == 2
    pool.free(blocks)
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.free(blocks)


def test_blocks_needed_rounds_up():
    pool = BlockPool(4, 16)
    assert [pool.blocks_needed(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_pool_is_sized_from_a_memory_budget():
    cfg = tiny_cfg()
    per_block = bytes_per_block(cfg, 16, torch.bfloat16)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 2  # k+v, layers, slots, kv heads, head dim, bytes
    n = num_blocks_for(cfg, KVCacheConfig(block_size=16, memory_bytes=10 * per_block + 1), torch.bfloat16)
    assert n == 10
    kv = KVCache(cfg, n, 16, torch.bfloat16)
    assert kv.nbytes == 10 * per_block
    assert num_blocks_for(cfg, KVCacheConfig(num_blocks=3), torch.float32) == 3
    with pytest.raises(ValueError):
        num_blocks_for(cfg, KVCacheConfig(memory_bytes=per_block - 1), torch.bfloat16)


def test_glm_4_9b_chat_kv_bytes_per_token(real_chat_dir):
    cfg = ModelConfig.from_dir(real_chat_dir)
    # GLM4.md: 40 layers x 2 x 2 heads x 128 x 2 bytes = 40 KiB per token in bf16
    assert bytes_per_block(cfg, 1, torch.bfloat16) == 40 * 1024
    assert cfg.rope_theta == 5e6 and cfg.rotary_dim == 64 and cfg.max_position_embeddings == 131072
    assert cfg.eos_token_ids == (151329, 151336, 151338)
