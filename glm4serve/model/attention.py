"""Attention over the paged KV cache.

One forward carries a flat list of T new tokens: first the tokens of each *prefill span* (a chunk of
one sequence's prompt, any length), then one token per *decode* sequence. Every new token's K/V is
written into its cache slot first; then each query attends to its sequence's cached keys up to and
including its own position.

Working memory stays bounded for 128K contexts: a prefill span is processed in query tiles sized
so that one tile's mask/scores never exceed `SCORE_BUDGET` elements, and only keys up to the tile's
last position are read. Nothing of size (query length x key length) is ever built for a long span.
Scores and softmax accumulate in fp32 inside SDPA (its CPU and CUDA kernels do for bf16/fp16 too).

On CPU a tile is also at most QUERY_TILE queries: SDPA's CPU kernel computes every score of a
boolean mask, the masked ones too, so a tile pays for the triangle of keys past its first query;
smaller tiles leave less of it. Measured at glm-4-9b's heads on a 2,048-token chunk (2 cores, AMX,
BENCHMARKS.md "Long prefill on CPU"): 256 queries against one tile of 2,048, 98 -> 49 ms with no
cached prefix, 395 -> 314 ms after 6,144 cached tokens; 128 and 64 were no faster.

On CPU, decodes (one query a sequence) and spans (a speculative draft, a prompt chunk; of any length in bf16 at
GLM-4's heads on CPUs with AMX-BF16, in a chunk kernel of their own; of up to 64 queries where the kernel runs in
AVX2, of up to 8 where a KV head's query group fills under a vector: cpu_attention.takes_span) attend in
decode_attention.c (cpu_attention.py), which reads each sequence's blocks in place; where it does not run,
decode_attention gathers the blocks and calls SDPA, and a span attends in the query tiles above. On a GPU, decodes
take paged_decode.py's kernel.

On a GPU in half precision all the step's prefill spans attend in one call of flash attention's
variable-length kernel, over their contexts gathered from the cache into one packed K/V
(`PackedPrefill`, built once a step): a step of many prompts is a few kernels a layer, not a few
for each prompt.

A short span on a CPU the kernel does not run on (no AVX2, no C compiler) folds each KV head's group
of query heads into the query axis, as decode does: one pass over each KV head's keys serves all
its queries, where SDPA's GQA reads them once per query head. At glm-4-9b's heads, 5 queries after
8,192 cached tokens: 8.2 -> 2.2 ms a layer; it loses from 64 queries (BENCHMARKS.md, "Speculative
decoding").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from . import cpu_attention
from .kv_cache import FP8, fp8_bytes

# cuDNN's attention (SDPA's first choice on Hopper and later since torch 2.9) builds an execution
# graph for each new shape, some hundreds of ms: every prompt of a new length, and every step
# holding one, would wait for it. Flash and memory-efficient kernels take any length as it comes.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

SCORE_BUDGET = 1 << 24  # elements of one tile's (query x key) mask: 16M -> ~64 MB as float
QUERY_TILE = 256  # most queries in one CPU tile (module docstring)
FOLD_MAX_QUERIES = 32  # CPU spans of at most this many queries fold the GQA groups (module docstring)


@dataclass
class PrefillSpan:
    """New tokens [token_start, token_start + num_tokens) of the flat batch belong to one sequence
    whose cached context, these tokens included, is `context_len` long."""

    token_start: int
    num_tokens: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks] long, covering context_len tokens


@dataclass
class PackedPrefill:
    """The prefill spans laid end to end, as flash attention's variable-length kernel takes them:
    span i's queries are rows cu_q[i]:cu_q[i + 1] of the batch, its keys rows cu_k[i]:cu_k[i + 1] of
    the cache slots `context_slots` gathers (its whole context, these tokens included)."""

    context_slots: torch.Tensor  # [sum of context_len] long: flat cache slots, span after span
    cu_q: torch.Tensor  # [spans + 1] int32
    cu_k: torch.Tensor  # [spans + 1] int32
    max_q: int
    max_k: int


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    packed: PackedPrefill | None = None  # the spans for one varlen flash call (built for GPUs)
    num_prefill_tokens: int = 0  # decode tokens are [num_prefill_tokens, T)
    decode_block_tables: torch.Tensor | None = None  # [B_dec, nb] long, zero padded; nb covers the longest
    decode_context_lens: torch.Tensor | None = None  # [B_dec] long, this token included
    paged_decode: bool = False  # decodes through paged_decode.py's kernel (GPU)

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_context_lens is None else int(self.decode_context_lens.shape[0])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch):
    """Store new keys/values [T, Hkv, D] at the batch's flat slots of caches [blocks, block_size, Hkv, D].

    A nan or inf is stored as 0 where decodes attend in PyTorch (decode_attention, and the CPU runner's
    compiled decode): they read whole blocks behind a mask, and a masked slot still counts as 0 x value
    and score + -inf, so a nan or inf left in a block by one sequence (an fp16 overflow) would turn the
    output of every later holder of the block into nan (an inf kept as the dtype's largest value would
    overflow the score). The sequence that made it is garbage either way. paged_decode.py's kernel never
    reads past a context, nor does prefill attention (gather_kv)."""
    num_blocks, block_size, hkv, d = k_cache.shape
    k_slots, v_slots = (c.view(num_blocks * block_size, hkv, d) for c in (k_cache, v_cache))
    store_kv(k_slots, v_slots, k, v, batch.slot_mapping, finite=not batch.paged_decode)


def store_kv(k_slots: torch.Tensor, v_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             finite: bool):
    """write_kv's stores into caches seen as rows of token slots [blocks * block_size, Hkv, D], nan and
    inf as 0 if `finite`; plain tensors in, for a compiled piece to hold. An fp8 cache gets torch's cast, which
    saturates at e4m3's +-448 (it has no inf; test_kv_fp8 pins it), copied as bytes (index_copy_ has no fp8 kernel
    on CPU); kv_cache.fp8_bytes warns where a prompt's values pass that range."""
    if finite:
        k, v = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (k, v))
    if k_slots.dtype == FP8:
        k, v = fp8_bytes(k), fp8_bytes(v)
        k_slots, v_slots = k_slots.view(torch.uint8), v_slots.view(torch.uint8)
    k_slots.index_copy_(0, slots, k)
    v_slots.index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached vectors of one sequence, as `dtype`: [length, Hkv, D]."""
    _, block_size, hkv, d = cache.shape
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])  # [nb, block_size, Hkv, D]
    return blocks.view(num_blocks * block_size, hkv, d)[:length].to(dtype)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: PrefillSpan, scale: float
) -> torch.Tensor:
    """Causal attention of one span's queries q [n, Hq, D] over the sequence's cache -> [n, Hq, D]."""
    n, hq, d = q.shape
    if cpu_attention.runs(q, k_cache) and cpu_attention.takes_span(n, q, k_cache):
        return cpu_attention.span_attention(q, k_cache, v_cache, span.block_table, span.context_len, scale)
    past = span.context_len - n  # cached tokens before this span
    # 4-D [1, heads, len, D]: with a batch axis SDPA's CPU kernel stays the tiled flash one
    # [ctx, Hkv, D] -> [1, Hkv, ctx, D]
    k_all = gather_kv(k_cache, span.block_table, span.context_len, q.dtype).transpose(0, 1)[None]
    v_all = gather_kv(v_cache, span.block_table, span.context_len, q.dtype).transpose(0, 1)[None]
    if q.device.type == "cuda":
        return causal_attention_gpu(q.transpose(0, 1)[None], k_all, v_all, scale)[0].transpose(0, 1)  # [n, Hq, D]
    hkv = k_all.shape[1]
    if n <= FOLD_MAX_QUERIES and n * (hq // hkv) * span.context_len <= SCORE_BUDGET:
        return folded_span_attention(q, k_all, v_all, past, scale)
    qh = q.transpose(0, 1)[None]  # [1, Hq, n, D]
    out = torch.empty_like(qh)
    tile = max(1, min(n, QUERY_TILE, SCORE_BUDGET // span.context_len))
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        kv_len = past + i1  # keys beyond the tile's last query are never needed
        # query i (absolute position past + i) sees keys 0..past + i
        q_pos = torch.arange(past + i0, past + i1, device=q.device)[:, None]  # [tile, 1]
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos  # [tile, kv_len]
        out[:, :, i0:i1] = F.scaled_dot_product_attention(
            qh[:, :, i0:i1], k_all[:, :, :kv_len], v_all[:, :, :kv_len], attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [n, Hq, D]


def folded_span_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, past: int,
                          scale: float) -> torch.Tensor:
    """q [n, Hq, D] at positions past.. over k_all, v_all [1, Hkv, past + n, D] -> [n, Hq, D], with
    each KV head's G query heads as G x n rows of one head."""
    n, hq, d = q.shape
    hkv, ctx = k_all.shape[1], k_all.shape[2]
    g = hq // hkv
    qg = q.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * n, d)  # [n, Hkv, G, D] -> [1, Hkv, G*n, D]
    mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(past, ctx, device=q.device)[:, None]  # [n, ctx]
    out = F.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=mask.repeat(g, 1), scale=scale)
    return out.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)  # [Hkv, G, n, D] -> [n, Hq, D]


def causal_attention_gpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, Hq, n, D] over k, v [1, Hkv, ctx, D], query i at position ctx - n + i -> [1, Hq, n, D].

    CUDA's flash and memory-efficient kernels take this mask as a flag (causal, aligned to the
    last key) and never build it; the tiled boolean-mask path with GQA, measured on an H100, ran
    8x slower than transformers at 32K tokens. Flash (half precision) reads each KV head for its
    group of query heads. The memory-efficient kernel (float32) takes no GQA, so for it the K/V
    heads are repeated: a transient of 2 x ctx x Hq x D."""
    mask = causal_lower_right(q.shape[2], k.shape[2])
    with sdpa_kernel(PREFILL_BACKENDS):  # a span as long as its context (no cached prefix) is plain SDPA's
        if can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [1, Hq, ctx, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its first context_lens[b] cached keys and values (this token's
    included), blocks block_tables [B, nb] -> [B, Hq, D], in PyTorch (the reference the kernels are tested
    against)."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    length = block_tables.shape[1] * block_size
    mask = torch.arange(length, device=q.device)[None, :] < context_lens[:, None]  # [B, L]: the padding's slots
    blocks = block_tables.view(-1)  # index_select gathers ~2.5x faster than k_cache[block_tables]
    # [B * nb, block_size, Hkv, D] -> [B, L, Hkv, D] -> [B, Hkv, L, D]
    k = k_cache.index_select(0, blocks).view(b, length, hkv, d).transpose(1, 2).to(q.dtype)
    v = v_cache.index_select(0, blocks).view(b, length, hkv, d).transpose(1, 2).to(q.dtype)
    # GQA without repeating K/V: fold each KV head's group of query heads into the query axis.
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.view(b, 1, 1, length), scale=scale)
    return out.reshape(b, hq, d)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Write the new k/v [T, Hkv, D] into the cache, then attend for all T queries q [T, Hq, D]."""
    write_kv(k_cache, v_cache, k, v, batch)
    return cached_attention(q, k_cache, v_cache, batch, scale)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                     scale: float) -> torch.Tensor:
    """All T queries q [T, Hq, D] over the cache, which holds their own tokens' K/V already -> [T, Hq, D]."""
    if not batch.prefills:  # decodes only: nothing to assemble
        return decodes_attention(q, k_cache, v_cache, batch, scale)
    out = torch.empty_like(q)
    if batch.packed is not None and flash_varlen_runs(q):
        p = batch.num_prefill_tokens
        out[:p] = packed_prefill_attention(q[:p], k_cache, v_cache, batch.packed, scale)
    else:
        for span in batch.prefills:
            s = slice(span.token_start, span.token_start + span.num_tokens)
            out[s] = prefill_attention(q[s], k_cache, v_cache, span, scale)
    if batch.num_decodes:
        s = slice(batch.num_prefill_tokens, batch.num_prefill_tokens + batch.num_decodes)
        out[s] = decodes_attention(q[s], k_cache, v_cache, batch, scale)
    return out


def packed_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, packed: PackedPrefill,
                             scale: float) -> torch.Tensor:
    """Every prefill span's queries q [P, Hq, D] (span after span) over its context -> [P, Hq, D]."""
    num_blocks, block_size, hkv, d = k_cache.shape
    # [blocks, block_size, Hkv, D] -> [slots, Hkv, D] -> the spans' contexts end to end [sum ctx, Hkv, D]
    k = k_cache.view(num_blocks * block_size, hkv, d).index_select(0, packed.context_slots).to(q.dtype)
    v = v_cache.view(num_blocks * block_size, hkv, d).index_select(0, packed.context_slots).to(q.dtype)
    return flash_varlen(q, k, v, packed, scale)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedPrefill,
                 scale: float) -> torch.Tensor:
    """Flash attention over packed spans, causal aligned to each span's last key (a span's queries are
    the last of its context), GQA heads shared -> [P, Hq, D]."""
    return torch.ops.aten._flash_attention_forward(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k,
                                                   0.0, True, False, scale=scale)[0]


def flash_varlen_runs(q: torch.Tensor) -> bool:
    """Whether flash attention's kernel takes these queries q [T, Hq, D], by PyTorch's own check (half
    precision, the head size, an Ampere or later GPU, flash not turned off)."""
    qh = q.transpose(0, 1)[None]  # [1, Hq, T, D], as SDPA takes it
    return q.is_cuda and can_use_flash_attention(SDPAParams(qh, qh, qh, None, 0.0, True, False))


def decodes_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                      scale: float) -> torch.Tensor:
    """The batch's decode queries q [B_dec, Hq, D] -> [B_dec, Hq, D], by the path the batch was built for."""
    if batch.paged_decode:
        from .paged_decode import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, scale)
    if cpu_attention.runs(q, k_cache):
        return cpu_attention.decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens,
                                              scale)
    return decode_attention(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, scale)


def decode_attention_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         context_len: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's query q [1, Hq, D] over its cached keys/values -> [1, Hq * D], written for
    inductor to compile (cpu_runner.py): the blocks gathered by index, scores, softmax, weighted
    values. block_table [nb], context_len [1] (this token included); caches [blocks, block_size, Hkv, D]."""
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    # [nb, bs, Hkv, D] -> [L, Hkv, D] -> [Hkv, L, D]
    k = k_cache[block_table].flatten(0, 1).transpose(0, 1).to(q.dtype)
    v = v_cache[block_table].flatten(0, 1).transpose(0, 1).to(q.dtype)
    qg = q.view(hkv, hq // hkv, d)  # [Hkv, G, D]: each KV head's group of query heads
    scores = (qg[:, :, None, :] * k[:, None]).sum(-1) * scale  # [Hkv, G, L]
    valid = torch.arange(k.shape[1], device=q.device) < context_len  # [L]: the last block's unused slots
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return (probs[..., None] * v[:, None]).sum(2).view(1, hq * d)  # [Hkv, G, L, D] -> [Hkv, G, D] -> [1, Hq * D]
