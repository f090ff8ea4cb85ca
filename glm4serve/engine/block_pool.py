"""The KV block pool: which cache blocks each sequence holds, and the prefix cache over them.

A sequence owns a *block table*, the list of block ids that hold its tokens in order: token
`t` of the sequence lives in block `table[t // block_size]`, slot `t % block_size`, i.e. at the
flat slot `table[t // block_size] * block_size + t % block_size`. Blocks are reference counted
so that `n > 1` choices (or requests with a common prefix) can share the prompt's blocks.

Prefix caching: a full block whose K/V is computed can be registered under the chain hash of its
tokens (`hash_block`). It stays in the pool after its last reader frees it, until an allocation
needs the room, so a later request with the same prefix skips computing it.

Pure bookkeeping: the tensors the ids index are the model runner's (model/kv_cache.py).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class NoFreeBlocks(RuntimeError):
    pass


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chain hash of a full block: its tokens and, through `parent` (b"" for block 0), every token before.

    K/V of a block depend on all the tokens up to its end, so equal chain hashes mean equal K/V.
    A cryptographic hash, not Python's hash(): a crafted prompt must not collide with another
    request's prefix and read its cache.
    """
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_root(lora: str | None, salt: str | None = None) -> bytes:
    """The `parent` of a sequence's block 0. A LoRA adapter's K/V differ from the base model's for the
    same tokens, so its chain starts elsewhere; so does that of a request with a cache salt (vLLM's
    `cache_salt`), whose prompt's blocks only requests with the same salt can find."""
    root = b"" if lora is None else hashlib.sha256(b"lora:" + lora.encode()).digest()
    return root if salt is None else hashlib.sha256(root + b"salt:" + salt.encode()).digest()


class BlockPool:
    """Allocator of KV block ids with reference counts, and the prefix cache over them. Pure Python.

    A block is in one of three states:
    - used: reference count > 0;
    - cached: count 0 but its content is registered under a hash, so a later request with the
      same prefix can take it back (`share`); it still counts as free and is evicted, least
      recently freed first, when the plain free blocks run out;
    - free: count 0 and no content worth keeping.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently freed first
        self._block_of: dict[bytes, int] = {}  # hash -> block holding that content
        self._hash_of: dict[int, bytes] = {}  # the reverse, to forget a block's hash when it is evicted
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: the plain free ones and the evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_empty(self) -> int:
        """Free blocks that hold nothing cached: allocating up to this many evicts no prefix."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, used or evictable."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently freed cached block: its content is overwritten
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
                self.num_evictions += 1
            self._ref[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Take one more reference on each block: a forked choice reading the same prompt, or a
        prefix cache hit (which takes a cached block back from the evictable ones)."""
        for b in blocks:
            if self._ref[b] == 0 and b in self._evictable:
                del self._evictable[b]
            elif self._ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._ref[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """Drop a reference on each; cached blocks that reach 0 join the evictable ones in this order
        (so the first given is evicted first)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def register(self, block: int, block_hash: bytes) -> bool:
        """Record that the used `block` holds the full, computed content `block_hash`.

        False (nothing recorded) when another block already holds that content: two sequences
        computed the same prefix at once, and the first one's block stays the cached one.
        """
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        known = self._hash_of.get(block)
        if known is not None:
            if known != block_hash:
                raise ValueError(f"block {block} is already registered with other content")
            return True
        if block_hash in self._block_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this content, used or evictable; takes no reference."""
        return self._block_of.get(block_hash)

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable
