"""The paged KV cache's tensors: K and V of every layer, in fixed-size blocks of token slots.

Which block holds which sequence's tokens is the engine's bookkeeping (engine/block_pool.py);
here a block is only an index into the first axis.

The cache holds the model's dtype, or fp8 e4m3 (`--kv-cache-dtype fp8`, vLLM's flag and its default scale of 1:
values stored as they are, saturating at e4m3's +-448), half of bf16's bytes: twice the tokens in the same memory, and
half the reads of a long context's decode. Attention widens it back as it reads (cpu_attention.py's kernels, or
`.to()` in PyTorch's paths); writes go through attention.store_kv.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .config import ModelConfig
from .shard import Shard


log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
KV_CACHE_DTYPES = {"fp8": FP8, "fp8_e4m3": FP8}  # --kv-cache-dtype's values besides "auto" (the model's dtype)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for --kv-cache-dtype `name`."""
    return model_dtype if name == "auto" else KV_CACHE_DTYPES[name]


def fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    """K or V values [T, Hkv, D] cast to e4m3 (torch's cast: round to nearest, saturating at +-448), as bytes. A
    prompt's chunk (T > 1) is first checked against that range: where a model's K or V pass it, vLLM's scale of 1
    does not suit it, and the log says so once."""
    if t.shape[0] > 1 and float(t.abs().amax()) > FP8_MAX:
        _warn_saturated()
    return t.to(FP8).view(torch.uint8)


@functools.cache
def _warn_saturated() -> None:
    log.warning("K or V values past fp8 e4m3's +-448 were saturated in the KV cache (--kv-cache-dtype fp8, with no "
                "scale): this model's attention is distorted; serve it with --kv-cache-dtype auto")


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, shard: Shard = Shard()) -> int:
    """K and V of one token in every layer (this rank's heads): 40 KiB for glm-4-9b-chat in bf16."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * shard.kv_heads(cfg) * cfg.head_dim * elem


class KVCache:
    """K and V tensors of every layer, each [num_blocks, block_size, num_kv_heads, head_dim] (this rank's
    KV heads under tensor parallelism). `zeros(shape, dtype)` allocates each of them (torch.zeros on
    `device` unless given)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu",
                 zeros: Callable[[tuple, torch.dtype], torch.Tensor] | None = None, shard: Shard = Shard()):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, shard.kv_heads(cfg), cfg.head_dim)
        zeros = zeros or (lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device))
        self.k = [zeros(shape, dtype) for _ in range(cfg.num_layers)]
        self.v = [zeros(shape, dtype) for _ in range(cfg.num_layers)]
        # the same memory as [num_blocks * block_size, Hkv, D], a row per token slot: what a compiled
        # piece writes into (given a view made inside its graph, torch 2.11's inductor copies the cache)
        self.k_slots = [t.view(-1, *shape[2:]) for t in self.k]
        self.v_slots = [t.view(-1, *shape[2:]) for t in self.v]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block src's content into block dst, for each (src, dst), in every layer."""
        if not pairs:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        for cache in self.k + self.v:
            cache = cache.view(torch.uint8) if cache.dtype == FP8 else cache  # index_copy_ has no fp8 kernel on CPU
            cache.index_copy_(0, dst, cache.index_select(0, src))
