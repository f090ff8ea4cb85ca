"""Paged K/V caches for the decode attention kernels' tests (test_paged_decode.py, test_cpu_attention.py)."""

from __future__ import annotations

import torch


def scattered_cache(hq, hkv, d, block_size, lens, dtype, device="cpu", seed=0, q_scale=1.0):
    """Random caches, and block tables that take the blocks in a shuffled order (tables zero padded) -> q [B, Hq, D]
    (times q_scale), k, v, tables [B, width], lens [B]."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    k = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.long)
    taken = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(order[taken : taken + n])
        taken += n
    q = (torch.randn(len(lens), hq, d, generator=g) * q_scale).to(device, dtype)
    return q, k, v, tables.to(device), torch.tensor(lens, device=device)
