"""The KV block pool's allocation and reference counts (prefix caching: test_prefix_cache.py)."""

import pytest

from glm4serve.engine.block_pool import BlockPool, NoFreeBlocks


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
