"""Decode attention on CPU in decode_attention.c, built on first use like the int8 kernels (int8_kernel.py:
the system C compiler, a cache folder, ctypes, torch's OpenMP runtime).

PyTorch's way (attention.decode_attention) gathers every decoding sequence's blocks into a new
tensor, each layer and step, and runs SDPA over the copy; the kernel reads the blocks in place,
each sequence to its own length (no padding to the longest), in fp32 sums, over bf16 or fp32
caches. At glm-4-9b's heads on an AMD EPYC, a layer's decode attention 2.5-3.9x quicker (1.7-2.4x
without AVX-512 BF16), from one sequence at 512-32K tokens of context to 64 sequences of 512; the
40-layer int4 decode step 1.6x at 8K, 2.0x at 16K and 2.4x at 32K (BENCHMARKS.md, "Decode attention on CPU"
and the sections after it). At glm-4-9b-chat-1m's heads (groups of 8), the avx512bf16 build packs two KV
heads a vector (packs()).

fp8 caches (--kv-cache-dtype fp8, e4m3) are widened exactly as they are read (fp8.h): to bf16 for the AMX build's
tiles (the decode kernel a step of 16 tokens at a time, the chunk kernel as it packs a kv block), to fp32 in the
other builds (the avx512bf16 build's bf16 pairs take bf16 caches only). Half the bytes read: one sequence's 32K-token
decode from memory 1.23x quicker than over bf16 in the AMX build, 1.40x in the AVX-512 BF16 build, 1.10x in AVX2's;
prompt chunks in the chunk kernel cost the same (BENCHMARKS.md, "An fp8 KV cache").

A sequence may bring up to MAX_SPAN_QUERIES queries, its last tokens (a speculative draft, a prompt chunk),
each seeing the context up to its own token: a step's keys and values are read once for all of them; a longer
span goes as sub-spans of that many. Against PyTorch's gather and SDPA (attention.py), a layer's span of 2-64
queries 1.5-3.2x quicker at 512-32K tokens (BENCHMARKS.md, "Speculative drafts in the decode attention kernel"),
and a 2,048-token prompt chunk 1.1-2.4x, with or without a cached prefix ("Prompt chunks in the decode attention
kernel"). That holds where a KV head's query group fills a vector's 16 lanes (glm-4-9b's 16; the 1M variant's 8,
two KV heads a vector in bf16); where it fills fewer (small test models, or 8 in fp32) the kernel lost from ~10
queries on, so it takes spans of up to UNFILLED_SPAN_QUERIES there. In the AVX2 build long spans measured level
with PyTorch's: there spans past SHORT_SPAN_QUERIES keep PyTorch's way (short_spans_only), as do fp32 spans on CPUs
with AMX (unmeasured). bf16 spans on CPUs with AMX-BF16 (amx_spans), where PyTorch's SDPA multiplies a span's
scores on AMX tiles: the AVX-512 BF16 build lost to it at every span length (0.2-0.7x). There the AMX build's chunk
kernel (chunk_attention_amx.h: tiles of 16 rows of a query and head, a kv block's keys and values packed once for
all of a unit's rows) takes the spans of glm-4-9b's and the 1M variant's heads, of any length that gives each
thread a row group (chunk_takes): against PyTorch's way 2.0-2.5x on prompt chunks of 256-2,048 queries, 2-6x on
drafts and short chunks, and 1.4-4.6x the decode kernel's AMX build (BENCHMARKS.md, "Prompt chunks on AMX tiles").
Spans of other heads take the decode kernel's AMX build up to AMX_SPAN_QUERIES (each query multiplies its own
tiles: longer spans lost, 0.45-1.0x), and with no AMX build they all keep PyTorch's way.

Its builds: AMX's (Sapphire Rapids and later Xeons) multiplies bf16 caches on AMX-BF16 tiles: there a layer 1.6-3.1x
PyTorch's way and, from 2K tokens, 2.2-2.5x the AVX-512 BF16 build (bound by its vdpbf16ps); the 40-layer int4 step
1.33-1.43x PyTorch's at 32K (BENCHMARKS.md, "Decode attention on AMX tiles"). AVX-512 BF16's reads bf16 caches as they
are; AVX-512's widens them to fp32; AVX2's (CPUs without AVX-512, or GLM4SERVE_MAX_CPU_ISA=avx2) takes a vector's 16
query heads as two halves. Without AVX2 and FMA, a C
compiler, or on a build error (logged), `runs()` is False and decodes attend in PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .int8_kernel import cpu_has, load_library
from .kv_cache import FP8

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # the ISA is each function's target attribute
CPU_FLAGS = ("avx2", "fma", "f16c")  # F16C widens fp8 caches (fp8.h)
MAX_HEAD_DIM = 256  # decode_attention.c's MAX_D
MAX_SPLITS = 64  # and its MAX_SPLITS
MAX_SPAN_QUERIES = 64  # and its MAX_SPAN: one sequence's queries in a call
SHORT_SPAN_QUERIES = 64  # the longest span the kernel takes where short_spans_only() (module docstring)
UNFILLED_SPAN_QUERIES = 8  # and where a KV head's group fills under a vector's lanes
AMX_SPAN_QUERIES = 32  # the longest bf16 span the AMX build takes on an AMX CPU (amx_spans) outside chunk_takes
CHUNK_HEAD_DIM = 128  # the head size of chunk_attention_amx.h (CHUNK_D)
CALL_QUERIES = 1024  # a long span's sub-spans go this many queries a call, which bounds the call's scratch
UNITS_PER_THREAD = 8  # a sequence's context is split until a batch has this many units of work a thread
MIN_SPLIT_TOKENS = 128  # but no split shorter than this


# decode_attention.c's builds, the fastest first, and the CPU flags each needs. avx512bf16 multiplies bf16 caches
# in pairs with vdpbf16ps; fp32 caches take the avx512 way there too; avx2 takes 16 query heads as two halves.
BUILDS = {"amx": ("amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512_bf16", "f16c"),
          "avx512bf16": ("avx512f", "avx512bw", "avx512_bf16", "f16c"), "avx512": ("avx512f", "f16c"),
          "avx2": CPU_FLAGS}
LANES = 16  # query heads a unit of work takes (decode_attention.c's LANES)


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, FLAGS, CPU_FLAGS, "decode attention runs in PyTorch")


@functools.cache
def builds() -> list[str]:
    """The builds this CPU runs, the fastest first (avx2 alone with GLM4SERVE_MAX_CPU_ISA=avx2); cached, as every
    layer's call asks (reading /proc/cpuinfo takes ~50 us)."""
    return [name for name, flags in BUILDS.items() if _library() is not None and cpu_has(flags)
            and (name != "amx" or _amx_granted())]


@functools.cache
def _amx_granted() -> bool:
    """The library has the AMX build (a compiler that knows AMX) and Linux grants this process the tile state."""
    return hasattr(_library(), "paged_attention_amx") and _library().amx_request() == 0


@functools.cache
def _kernel(build: str | None = None) -> ctypes._CFuncPtr | None:
    """A build's function (by default the fastest here); None where none runs."""
    runnable = builds()
    if not runnable:
        return None
    build = build or runnable[0]
    fn = getattr(_library(), f"paged_attention_{build}")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64,
                   ctypes.c_float, i64, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel takes these queries q [T, Hq, D] over this cache [blocks, block_size, Hkv, D]: fp32 or bf16, over
    a cache of their type or of fp8 e4m3."""
    d = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and k_cache.dtype in (q.dtype, FP8)
            and d % 8 == 0 and d <= MAX_HEAD_DIM and k_cache.is_contiguous() and _kernel() is not None)


def packs(build: str, dtype: torch.dtype, group: int, kv_heads: int) -> int:
    """KV heads a unit of work takes in one vector (decode_attention.c's PACKS): two in the avx512bf16 build for
    groups of 8 query heads (glm-4-9b-chat-1m) over a bf16 cache (`dtype`), whose lanes one KV head would fill half
    of."""
    return 2 if build == "avx512bf16" and dtype == torch.bfloat16 and 2 * group == LANES and kv_heads % 2 == 0 else 1


def splits_for(num_parts: int, max_context: int, threads: int) -> int:
    """How many parts each sequence's context is cut into, for a batch of num_parts (sequence, KV head, lanes of
    query heads) to give every thread a few units of work (module docstring)."""
    wanted = -(-UNITS_PER_THREAD * threads // num_parts)
    return max(1, min(wanted, MAX_SPLITS, max_context // MIN_SPLIT_TOKENS))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_starts: torch.Tensor, scale: float, splits: int | None = None,
                    build: str | None = None) -> torch.Tensor:
    """Each sequence b's queries, rows query_starts[b]:query_starts[b + 1] of q [T, Hq, D] (1 to MAX_SPAN_QUERIES),
    are the last tokens of its first context_lens[b] cached keys and values, causal: its i-th of n sees the first
    context_lens[b] - n + 1 + i. Blocks block_tables [B, width] of caches [blocks, block_size, Hkv, D] -> [T, Hq, D].
    splits: as splits_for chooses, unless given (1 to MAX_SPLITS); build: one of builds(), by default the first."""
    _, hq, d = q.shape
    b = block_tables.shape[0]
    _, block_size, hkv, _ = k_cache.shape
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    starts = query_starts.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    threads = torch.get_num_threads()
    build = build or builds()[0]
    pack = packs(build, k_cache.dtype, hq // hkv, hkv)
    parts = b * hkv // pack * -(-(hq // hkv) // (LANES // pack))  # units of work before the splits
    splits = splits or splits_for(parts, int(lens.max()), threads)
    kernel = _kernel(build)
    status = kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(q.dtype == torch.bfloat16),
                    int(k_cache.dtype == FP8), tables.data_ptr(), tables.shape[1], lens.data_ptr(), starts.data_ptr(),
                    b, hq, hkv, d, block_size, scale, splits, out.data_ptr(), threads)
    if status == -2:
        raise ValueError(f"each sequence takes 1 to {MAX_SPAN_QUERIES} queries, no more than its context's tokens")
    if status != 0:
        raise MemoryError("paged attention's scratch could not be allocated")
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, splits: int | None = None,
                     build: str | None = None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its first context_lens[b] cached keys and values (this token's
    included) -> [B, Hq, D]; the rest as paged_attention."""
    starts = torch.arange(q.shape[0] + 1)
    return paged_attention(q, k_cache, v_cache, block_tables, context_lens, starts, scale, splits, build)


@functools.cache
def amx_spans() -> bool:
    """bf16 spans follow the AMX rule on this CPU (module docstring): it has AMX-BF16, on whose tiles PyTorch's SDPA
    multiplies a span's bf16 scores."""
    return cpu_has(("amx_bf16",))


def amx_takes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The AMX build multiplies these queries over this cache [blocks, block_size, Hkv, D] on its tiles: bf16 queries
    over a bf16 or fp8 cache, blocks of a multiple of 16 tokens, heads of a multiple of 32 elements
    (decode_attention_amx.h)."""
    return (q.dtype == torch.bfloat16 and k_cache.dtype in (q.dtype, FP8) and k_cache.shape[1] % 16 == 0
            and q.shape[-1] % 32 == 0)


@functools.cache
def short_spans_only() -> bool:
    """Long spans keep PyTorch's way on this CPU: with AMX (its tiles), or where the kernel runs in AVX2."""
    return amx_spans() or builds()[0] == "avx2"


def takes_span(n: int, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a span of n queries q [n, Hq, D] over this cache [blocks, block_size, Hkv, D] attends in the kernel
    (module docstring)."""
    if q.dtype == torch.bfloat16 and amx_spans():
        return chunk_takes(n, q, k_cache) or n <= AMX_SPAN_QUERIES and builds()[0] == "amx" and amx_takes(q, k_cache)
    group, kv_heads = q.shape[1] // k_cache.shape[2], k_cache.shape[2]
    if group * packs(builds()[0], k_cache.dtype, group, kv_heads) < LANES:
        return n <= UNFILLED_SPAN_QUERIES
    return n <= SHORT_SPAN_QUERIES or not short_spans_only()


@functools.cache
def _chunk_kernel() -> ctypes._CFuncPtr:
    fn = _library().chunk_attention_amx
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def chunk_takes(n: int, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The AMX build's chunk kernel (chunk_attention_amx.h) takes a span of n queries q [n, Hq, D] over this cache
    [blocks, block_size, Hkv, D]: bf16 queries over a bf16 or fp8 cache, heads of CHUNK_HEAD_DIM, query groups that
    divide 16, blocks of a multiple of 16 tokens, and a row group (16 rows of a query and head) for each thread,
    whose units of work do not split the context (a short span over many threads keeps the decode kernel, whose
    units do)."""
    hq, kv_heads = q.shape[1], k_cache.shape[2]
    group = hq // kv_heads
    return (q.dtype == torch.bfloat16 and k_cache.dtype in (q.dtype, FP8) and q.shape[-1] == CHUNK_HEAD_DIM
            and group * kv_heads == hq and 16 % group == 0 and k_cache.shape[1] % 16 == 0
            and n * hq >= 16 * torch.get_num_threads() and builds()[:1] == ["amx"])


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    context_len: int, scale: float) -> torch.Tensor:
    """One sequence's last n tokens' queries q [n, Hq, D] (a prompt chunk), causal over its first context_len cached
    keys and values, blocks block_table [nb], in the AMX build's chunk kernel (chunk_takes) -> [n, Hq, D]."""
    n, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    q = q.contiguous()
    table = block_table.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = _chunk_kernel()(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == FP8),
                             table.data_ptr(), context_len, n, hq, hkv, d, block_size, scale, out.data_ptr(),
                             torch.get_num_threads())
    if status == -2:
        raise ValueError("the chunk kernel does not take these shapes (chunk_takes)")
    if status != 0:
        raise MemoryError("the chunk kernel's scratch could not be allocated")
    return out


def span_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   context_len: int, scale: float, splits: int | None = None, build: str | None = None) -> torch.Tensor:
    """One sequence's last n tokens' queries q [n, Hq, D] (a speculative draft, a prompt chunk), causal over its
    first context_len cached keys and values, blocks block_table [nb] -> [n, Hq, D]: sub-spans of at most
    MAX_SPAN_QUERIES, each as a sequence ending at its last query; the rest as paged_attention. Unless a build is
    given, a span the chunk kernel takes (chunk_takes) goes there whole."""
    n = q.shape[0]
    if build is None and chunk_takes(n, q, k_cache):
        return chunk_attention(q, k_cache, v_cache, block_table, context_len, scale)
    out = torch.empty_like(q)
    for c0 in range(0, n, CALL_QUERIES):
        c1 = min(n, c0 + CALL_QUERIES)
        cuts = torch.arange(c0, c1 + MAX_SPAN_QUERIES, MAX_SPAN_QUERIES).clamp(max=c1)  # sub-span edges in q
        lens = context_len - n + cuts[1:]  # each sub-span's context ends at its last query
        tables = block_table[None].expand(len(lens), -1)
        out[c0:c1] = paged_attention(q[c0:c1], k_cache, v_cache, tables, lens, cuts - c0, scale, splits, build)
    return out
