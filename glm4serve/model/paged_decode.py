"""Decode attention on a GPU: one query per sequence over its paged K/V, read in place (Triton).

Flash-decoding: the grid is (sequence, KV head, split). Each program takes the group of query
heads that share its KV head (16 for glm-4-9b: 32 over 2), walks its split's share of the
sequence's blocks through the block table, and keeps an online softmax; a few PyTorch ops then
merge the splits. The number of splits is fixed per batch size (enough programs to fill the card
at batch 1), each split's length follows the context length read on the device, so one launch
serves every context length without a host sync: a CUDA graph (cuda_runner.py) replays it as is.

On CPU, Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel: that is how the tests
check it against decode_attention in attention.py.
"""

from __future__ import annotations

import functools
import os
import shutil

import torch

from . import gemv

TILE = 64  # keys per loop step: 4 blocks of 16; tl.dot wants every side >= 16
MAX_SPLITS = 64


def unsupported(head_dim: int) -> str | None:
    """Why the kernel cannot run here, or None: it needs Triton, a C compiler for Triton (which builds
    its kernels' launchers with one on first use: CC, else gcc or clang, as triton/runtime/build.py
    looks; a CUDA *runtime* Docker image has none), and a head size that is a power of two >= 16 (128
    for every GLM-4)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler for Triton (install gcc)"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head size {head_dim} is not a power of two >= 16"
    return None


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs one launch aims for: two per SM on a GPU (132 SMs on an H100); a few in the interpreter."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): a power of two, more for small batches."""
    want = max(1, _programs(device) // (batch * kv_heads))
    return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # Triton compiles a kernel per specialization of its arguments: integers by ==1 and divisibility by
    # 16, pointers by 16-byte alignment. The block table's width (eager steps size it to the longest
    # context) and the offsets of the graph buffers' rows (cuda_runner.DecodeBuffers) would make
    # variants that no capture compiled, each a compile while serving. Neither feeds a wide load.
    @triton.jit(do_not_specialize=["stride_tb"], do_not_specialize_on_alignment=["tables_ptr", "lens_ptr"])
    def paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr, scale,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
        TILE: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # launched before the kernel this one follows (its q, K and V) has ended: nothing read before here
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = tl.arange(0, GP)  # this KV head's query heads, padded to a power of two >= 16
        dims = tl.arange(0, D)
        keys = tl.arange(0, TILE)
        q = tl.load(q_ptr + b * stride_qb + (h * G + heads)[:, None] * stride_qh + dims[None, :],
                    mask=(heads < G)[:, None], other=0.0)  # [GP, D]
        length = tl.load(lens_ptr + b)
        tiles = tl.cdiv(length, TILE)
        per_split = tl.cdiv(tiles, SPLITS)
        first = s * per_split
        last = tl.minimum(first + per_split, tiles)
        running_max = tl.full([GP], float("-inf"), tl.float32)
        running_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for t in range(first, last):
            pos = t * TILE + keys  # [TILE] positions in the sequence
            valid = pos < length
            block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK, mask=valid, other=0)
            offset = (block * stride_kb + (pos % BLOCK) * stride_kt + h * stride_kh)[:, None] + dims[None, :]
            k = tl.load(k_ptr + offset, mask=valid[:, None], other=0.0)  # [TILE, D]
            # fp32 products in full precision (not TF32); the interpreter's dot of 16-bit floats is
            # wrong (triton 3.9), so there 16-bit inputs are widened first
            if DOT_F32:
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale  # [GP, TILE] fp32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            p = tl.exp(scores - new_max[:, None])
            shrink = tl.exp(running_max - new_max)
            running_sum = running_sum * shrink + tl.sum(p, 1)
            v = tl.load(v_ptr + offset, mask=valid[:, None], other=0.0)  # [TILE, D]
            p = p.to(v.dtype)  # as a GPU's tensor cores take it
            if DOT_F32:
                acc = acc * shrink[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * shrink[:, None] + tl.dot(p, v)
            running_max = new_max
        row = (b * tl.num_programs(1) + h) * SPLITS + s  # [B, Hkv, S] flattened
        tl.store(max_ptr + row * GP + heads, running_max)
        tl.store(sum_ptr + row * GP + heads, running_sum)
        tl.store(acc_ptr + (row * GP + heads)[:, None] * D + dims[None, :], acc)

    return paged_decode_kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence, at its last position) over caches [blocks, block_size,
    Hkv, D]; block_tables [B, >= the blocks of context_lens] (any int type), context_lens [B] (this
    token included, >= 1) -> [B, Hq, D] in q's dtype."""
    partials = paged_decode_partials(q, k_cache, v_cache, block_tables, context_lens, scale)
    return merge_splits(*partials, q.shape[1]).to(q.dtype)


def paged_decode_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float, pdl: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's launch, as paged_decode_attention's arguments -> each split's unnormalized values
    acc [B, Hkv, S, GP, D], its score maxima and its sums of exponentials [B, Hkv, S, GP] (fp32), for
    merge_splits (which a runner may compile together with what follows attention). `pdl`: launched
    with programmatic dependent launch where the GPU has it (gemv.launches_pdl), as the batch-1 step's
    products are: its programs wait on the GPU for the kernel before, not behind a launch gap."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    groups = hq // hkv
    padded = max(16, 1 << (groups - 1).bit_length())
    splits = num_splits(b, hkv, q.device)
    q = q.contiguous()
    pdl = pdl and gemv.launches_pdl(q.device)
    acc = torch.empty(b, hkv, splits, padded, d, dtype=torch.float32, device=q.device)
    maxes = torch.empty(b, hkv, splits, padded, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    _kernel()[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, maxes, sums, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=groups, GP=padded, D=d, BLOCK=block_size, SPLITS=splits, TILE=TILE,
        DOT_F32=q.device.type == "cpu" or q.dtype == torch.float32, PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )
    return acc, maxes, sums


def merge_splits(acc: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The splits' partial results -> attention's output [B, Hq, D] in fp32: each split's sums and
    values rescaled to the largest score over all of them."""
    b, hkv, _, _, d = acc.shape
    # maxima and sums broadcast over D: every reduction over the splits below has acc's shape; and
    # each reduction weighs the splits on its own (no weights kept between them): compiled, one kernel
    maxes, sums = maxes[..., None].expand_as(acc), sums[..., None].expand_as(acc)  # [B, Hkv, S, GP, D]
    top = maxes.amax(dim=2, keepdim=True)  # finite, every sequence has a key
    total = (sums * torch.exp(maxes - top)).sum(dim=2)  # [B, Hkv, GP, D]; an empty split (-inf) weighs 0
    out = (acc * torch.exp(maxes - top)).sum(dim=2) / total  # [B, Hkv, GP, D]
    return out[:, :, : num_heads // hkv].reshape(b, num_heads, d)  # [B, Hkv, G, D] -> [B, Hq, D]
