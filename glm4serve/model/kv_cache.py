"""Paged KV cache: fixed-size blocks of K/V slots, and the pool that hands them out.

A sequence owns a *block table*, the list of block ids that hold its tokens in order: token
`t` of the sequence lives in block `table[t // block_size]`, slot `t % block_size`, i.e. at the
flat slot `table[t // block_size] * block_size + t % block_size`. Blocks are reference counted
so that `n > 1` choices (or requests with a common prefix) can share the prompt's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


class NoFreeBlocks(RuntimeError):
    pass


class BlockPool:
    """Allocator of KV block ids with reference counts. Pure Python: no tensors."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._ref[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Take one more reference on each block (a forked choice reading the same prompt)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._ref[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref[block]


@dataclass(frozen=True)
class KVCacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # explicit count wins over the budget
    memory_bytes: int = 1 << 30  # budget for K and V of all layers


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for(cfg: ModelConfig, cache_cfg: KVCacheConfig, dtype: torch.dtype) -> int:
    if cache_cfg.num_blocks is not None:
        return cache_cfg.num_blocks
    n = cache_cfg.memory_bytes // bytes_per_block(cfg, cache_cfg.block_size, dtype)
    if n < 1:
        raise ValueError(f"a KV budget of {cache_cfg.memory_bytes} bytes holds no block")
    return int(n)


class KVCache:
    """K and V tensors of every layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
