"""decode_attention.c (cpu_attention.py): one query per sequence, or a short span of a sequence's last tokens,
over its paged K/V, read in place, against PyTorch's decode attention (attention.decode_attention), in each build
the CPU runs."""

from __future__ import annotations

import pytest
import torch

from glm4serve.model import attention, cpu_attention
from glm4serve.model.attention import PrefillSpan, decode_attention
from glm4serve.model.batch import SeqChunk, build_batch
from tests.paged_caches import scattered_cache

pytestmark = pytest.mark.skipif(cpu_attention._kernel() is None, reason="decode_attention.c does not run here "
                                "(no AVX2 and FMA, or no C compiler)")

# (query heads, KV heads, head dim, block size, context lengths): glm-4-9b's 32 over 2 heads of 128;
# glm-4-9b-chat-1m's groups of 8 (two KV heads a vector in bf16's avx512bf16 build), and groups of 8 over an
# odd number of KV heads (one a vector); 64 over 2 (two units of 16 lanes a KV head); multi-head (groups of
# 1); groups of 3 (lanes left over); head sizes 16 to 256; blocks of 1, 4 and 64; lengths of 1, at and
# across block edges, and long enough to be split.
CASES = [
    (32, 2, 128, 16, [1, 16, 17, 300]),
    (32, 4, 128, 16, [5, 2000]),
    (24, 3, 64, 16, [40, 7]),
    (64, 2, 64, 8, [9, 129]),
    (4, 4, 32, 4, [3, 200, 1]),
    (6, 2, 16, 1, [1, 2, 40]),
    (12, 4, 256, 64, [63, 64, 65, 700]),
]


def pytorch_truth(q, k, v, tables, lens):
    return decode_attention(q.float(), k.float(), v.float(), tables, lens, q.shape[-1] ** -0.5)


@pytest.fixture(params=cpu_attention.builds())
def build(request):
    """Each build this CPU runs (AMX's, AVX-512 BF16's, AVX-512's, AVX2's)."""
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}over{c[1]}x{c[2]}-bs{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_equals_the_pytorch_decode_attention(case, dtype, build):
    hq, hkv, d, block_size, lens = case
    q, k, v, tables, ctx = scattered_cache(hq, hkv, d, block_size, lens, dtype, q_scale=3)
    assert cpu_attention.runs(q, k)
    truth = pytorch_truth(q, k, v, tables, ctx)
    for splits in (None, 1, 3, 64):
        ours = cpu_attention.decode_attention(q, k, v, tables, ctx, d**-0.5, splits=splits, build=build)
        assert ours.dtype == dtype and ours.shape == q.shape
        # fp32: sums in another order; bf16: the output rounded to bf16 (values of order 1), and in the avx512bf16
        # build the weights too
        bound = 2e-5 if dtype == torch.float32 else 1.6e-2
        assert (ours.float() - truth).abs().max().item() < bound, splits


def test_kernel_reads_nothing_past_the_context(build):
    """Keys past a sequence's length (the rest of its last block, and blocks the table does not list) are never
    read, by a decode or by a span: filling them with nan changes nothing."""
    q, k, v, tables, ctx = scattered_cache(32, 2, 128, 16, [20, 70], torch.bfloat16)
    span = q[1:].repeat(5, 1, 1)  # the last 5 tokens of the second sequence
    before = cpu_attention.decode_attention(q, k, v, tables, ctx, 0.1, build=build)
    span_before = cpu_attention.span_attention(span, k, v, tables[1], 70, 0.1, build=build)
    used = {(int(tables[i, p // 16]), p % 16) for i, n in enumerate(ctx.tolist()) for p in range(n)}
    for blk in range(k.shape[0]):
        for slot in range(16):
            if (blk, slot) not in used:
                k[blk, slot], v[blk, slot] = float("nan"), float("nan")
    after = cpu_attention.decode_attention(q, k, v, tables, ctx, 0.1, build=build)
    assert torch.equal(before, after)
    assert torch.equal(span_before, cpu_attention.span_attention(span, k, v, tables[1], 70, 0.1, build=build))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_scores_stay_finite(dtype):
    """Scores in the thousands (one key far above the rest) give that key's value, not inf or nan."""
    q, k, v, tables, ctx = scattered_cache(32, 2, 128, 16, [100], dtype)
    k[tables[0, 2], 5, 0] = q[0, :16].float().mean(0).to(dtype) * 100  # position 37 scores ~1e3 for KV head 0's heads
    ours = cpu_attention.decode_attention(q, k, v, tables, ctx, 128**-0.5)
    truth = pytorch_truth(q, k, v, tables, ctx)
    assert torch.isfinite(ours).all()
    assert (ours.float() - truth).abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_the_cpu_decodes_attend_in_the_kernel(monkeypatch):
    """attention.decodes_attention sends a CPU batch's decodes to the kernel, each sequence to its own length."""
    block_size, lens = 4, [3, 11, 30]
    q, k, v, tables, _ = scattered_cache(32, 2, 64, block_size, lens, torch.float32)
    chunks = [SeqChunk([1], n - 1, t[: -(-n // block_size)].tolist()) for n, t in zip(lens, tables)]
    batch = build_batch(chunks, block_size).attn
    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    ours = attention.decodes_attention(q, k, v, batch, 64**-0.5)
    assert len(calls) == 1
    truth = decode_attention(q, k, v, batch.decode_block_tables, batch.decode_context_lens, 64**-0.5)
    assert (ours - truth).abs().max().item() < 2e-6


def test_splits_give_each_thread_a_few_units():
    assert cpu_attention.splits_for(2, 16384, 2) == 8  # one sequence of glm-4-9b: its 2 KV heads, 8 parts each
    assert cpu_attention.splits_for(2, 300, 2) == 2  # no split under MIN_SPLIT_TOKENS
    assert cpu_attention.splits_for(2, 50, 2) == 1
    assert cpu_attention.splits_for(128, 16384, 2) == 1  # 64 sequences: already 64 units a thread
    assert cpu_attention.splits_for(1, 1 << 20, 64) == cpu_attention.MAX_SPLITS


def span_truth(q, k, v, table, ctx):
    """A span's n queries q [n, Hq, D] ending a context of ctx tokens, by PyTorch's decode attention: query i as
    the decode of a sequence ctx - n + 1 + i tokens long."""
    n = q.shape[0]
    return pytorch_truth(q, k, v, table[None].repeat(n, 1), torch.arange(ctx - n + 1, ctx + 1))


@pytest.mark.parametrize("n, ctx", [(2, 2), (5, 37), (17, 300), (64, 64), (64, 2000), (33, 5000)])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["9b", "1m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_span_attends_causally_as_the_decodes_of_its_prefixes(n, ctx, kv_heads, dtype, build):
    """A speculative draft or a short chunk: each query sees its context up to its own token, the same as the decode
    of that prefix; the step's keys are shared by the queries, which see different numbers of them."""
    _, k, v, tables, _ = scattered_cache(32, kv_heads, 128, 16, [ctx], dtype)
    q = (torch.randn(n, 32, 128, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    truth = span_truth(q, k, v, tables[0], ctx)
    for splits in (None, 1, 3):
        ours = cpu_attention.span_attention(q, k, v, tables[0], ctx, 128**-0.5, splits=splits, build=build)
        assert ours.dtype == dtype and ours.shape == q.shape
        bound = 1e-4 if dtype == torch.float32 else 1.6e-2  # fp32: up to 5,000 terms summed one by one in a split
        assert (ours.float() - truth).abs().max().item() < bound, splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_call_takes_spans_and_decodes_of_several_sequences(dtype, build):
    """paged_attention: sequences of 1, 4, 1 and 9 queries in one batch, at 64 over 2 heads (two lanes' chunks a KV
    head), each over its own blocks to its own length."""
    hq, hkv, d, bs, lens, spans = 64, 2, 64, 8, [9, 130, 40, 77], [1, 4, 1, 9]
    _, k, v, tables, ctx = scattered_cache(hq, hkv, d, bs, lens, dtype)
    q = torch.randn(sum(spans), hq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    starts = torch.tensor([0, *spans]).cumsum(0)
    ours = cpu_attention.paged_attention(q, k, v, tables, ctx, starts, d**-0.5, build=build)
    truth = torch.cat([span_truth(q[starts[b] : starts[b + 1]], k, v, tables[b], lens[b]) for b in range(4)])
    assert (ours.float() - truth).abs().max().item() < (2e-5 if dtype == torch.float32 else 1.6e-2)


def test_a_long_span_goes_as_sub_spans(build, monkeypatch):
    """A prompt chunk of more than MAX_SPAN_QUERIES queries: sub-spans of 64, each a sequence of its own ending at
    its last query, CALL_QUERIES of them a call (here 128, so three calls), the same as each prefix's decode."""
    monkeypatch.setattr(cpu_attention, "CALL_QUERIES", 128)
    n, ctx = 300, 700
    _, k, v, tables, _ = scattered_cache(32, 2, 64, 16, [ctx], torch.bfloat16)
    q = torch.randn(n, 32, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ours = cpu_attention.span_attention(q, k, v, tables[0], ctx, 0.125, build=build)
    assert (ours.float() - span_truth(q, k, v, tables[0], ctx)).abs().max().item() < 1.6e-2


def test_a_call_past_the_kernels_limits_is_refused():
    _, k, v, tables, _ = scattered_cache(32, 2, 128, 16, [100], torch.float32)
    for n, ctx in [(cpu_attention.MAX_SPAN_QUERIES + 1, 100), (5, 4)]:
        with pytest.raises(ValueError, match="1 to 64 queries"):
            cpu_attention.paged_attention(torch.randn(n, 32, 128), k, v, tables[:1], torch.tensor([ctx]),
                                          torch.tensor([0, n]), 0.1)


@pytest.mark.parametrize("short", [False, True], ids=["long-spans", "short-spans-only"])
def test_the_cpu_spans_attend_in_the_kernel(short, monkeypatch):
    """attention.prefill_attention sends a CPU span to the kernel, whatever its length, where each KV head's query
    group fills the lanes (here 16); on a CPU with AMX, or where the kernel runs in AVX2, only up to
    SHORT_SPAN_QUERIES queries (longer ones attend in PyTorch's query tiles)."""
    calls = []
    real = cpu_attention.span_attention
    monkeypatch.setattr(cpu_attention, "span_attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    monkeypatch.setattr(cpu_attention, "short_spans_only", lambda: short)
    monkeypatch.setattr(cpu_attention, "amx_spans", lambda: False)
    _, k, v, tables, _ = scattered_cache(32, 2, 64, 16, [400], torch.float32)
    for n, kernel_calls in [(64, 1), (65, 1 if short else 2), (300, 1 if short else 3)]:
        q = torch.randn(n, 32, 64, generator=torch.Generator().manual_seed(n))
        ours = attention.prefill_attention(q, k, v, PrefillSpan(0, n, 400, tables[0]), 0.125)
        assert len(calls) == kernel_calls
        assert (ours - span_truth(q, k, v, tables[0], 400)).abs().max().item() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spans_of_small_query_groups_attend_in_the_kernel_only_when_short(dtype, monkeypatch):
    """Groups of 4 fill a quarter of the lanes: up to UNFILLED_SPAN_QUERIES queries take the kernel, longer spans
    PyTorch; groups of 8 fill them in bf16 in the avx512bf16 build (two KV heads a vector), not in fp32 (the rule of
    CPUs without AMX-BF16)."""
    calls = []
    real = cpu_attention.span_attention
    monkeypatch.setattr(cpu_attention, "span_attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    monkeypatch.setattr(cpu_attention, "amx_spans", lambda: False)
    _, k, v, tables, _ = scattered_cache(8, 2, 64, 16, [300], dtype)
    for n, kernel_calls in [(8, 1), (9, 1)]:
        q = torch.randn(n, 8, 64).to(dtype)
        ours = attention.prefill_attention(q, k, v, PrefillSpan(0, n, 300, tables[0]), 0.125)
        assert len(calls) == kernel_calls
        assert (ours.float() - span_truth(q, k, v, tables[0], 300)).abs().max().item() < 1.6e-2
    packed = cpu_attention.builds()[0] == "avx512bf16" and dtype == torch.bfloat16
    longest = cpu_attention.SHORT_SPAN_QUERIES  # past UNFILLED_SPAN_QUERIES, and taken by every CPU where filled
    cache = torch.empty(1, 16, 4, 128, dtype=dtype)
    assert cpu_attention.takes_span(longest, torch.empty(1, 32, 128, dtype=dtype), cache) == packed


@pytest.mark.parametrize("first_build", ["amx", "avx512bf16"])
def test_on_amx_cpus_bf16_spans_take_the_kernel_only_in_the_amx_build_and_only_when_short(first_build, monkeypatch):
    """Where the CPU has AMX-BF16 (PyTorch's SDPA multiplies bf16 on its tiles), a bf16 span the chunk kernel does not
    take goes to the decode kernel only in the AMX build, up to AMX_SPAN_QUERIES queries, and only where the tiles
    take its cache (blocks of a multiple of 16 tokens, heads of a multiple of 32); fp32 spans keep the vector rule."""
    monkeypatch.setattr(cpu_attention, "amx_spans", lambda: True)
    monkeypatch.setattr(cpu_attention, "chunk_takes", lambda n, q, k_cache: False)
    monkeypatch.setattr(cpu_attention, "builds", lambda: [first_build, "avx512"])
    monkeypatch.setattr(cpu_attention, "short_spans_only", lambda: True)
    longest, q = cpu_attention.AMX_SPAN_QUERIES, torch.empty(1, 32, 128, dtype=torch.bfloat16)
    amx = first_build == "amx"

    def cache(block_size, d=128, dtype=torch.bfloat16):
        return torch.empty(1, block_size, 2, d, dtype=dtype)

    assert cpu_attention.takes_span(longest, q, cache(16)) == amx
    assert cpu_attention.takes_span(longest, q, cache(16, dtype=torch.float8_e4m3fn)) == amx  # --kv-cache-dtype fp8
    assert cpu_attention.takes_span(1, q, cache(32)) == amx
    assert not cpu_attention.takes_span(longest + 1, q, cache(16))
    assert not cpu_attention.takes_span(2, q, cache(8))  # blocks of 8: no tiles
    assert not cpu_attention.takes_span(2, torch.empty(1, 4, 48, dtype=torch.bfloat16), cache(16, 48))
    assert cpu_attention.takes_span(64, q.float(), cache(16, dtype=torch.float32))


def test_a_library_built_without_the_amx_targets_has_the_other_builds(monkeypatch):
    """A compiler without the AMX targets (GCC 10) builds decode_attention.c as -DNO_AMX does: no AMX build (so
    builds() leaves it out on any CPU), the others whole."""
    import ctypes

    from glm4serve.model import int8_kernel

    path = int8_kernel._build(int8_kernel._compiler(), cpu_attention.SOURCE, [*cpu_attention.FLAGS, "-DNO_AMX"])
    lib = ctypes.CDLL(str(path))
    assert not hasattr(lib, "paged_attention_amx") and hasattr(lib, "paged_attention_avx2")
    monkeypatch.setattr(cpu_attention, "_library", lambda: lib)
    for cached in (cpu_attention.builds, cpu_attention._amx_granted, cpu_attention._kernel):
        cached.cache_clear()
    try:
        assert "amx" not in cpu_attention.builds() and cpu_attention.builds()[-1] == "avx2"
        q, k, v, tables, ctx = scattered_cache(32, 2, 128, 16, [40], torch.bfloat16)
        ours = cpu_attention.decode_attention(q, k, v, tables, ctx, 128**-0.5)
        assert (ours.float() - pytorch_truth(q, k, v, tables, ctx)).abs().max().item() < 1.6e-2
    finally:
        for cached in (cpu_attention.builds, cpu_attention._amx_granted, cpu_attention._kernel):
            cached.cache_clear()


amx_chunks = pytest.mark.skipif(cpu_attention.builds()[:1] != ["amx"], reason="the chunk kernel runs in the AMX build, "
                                "on a CPU with AMX-BF16")


def causal_truth(q, k, v, table, ctx):
    """A span's n queries q [n, Hq, D] ending a context of ctx tokens, by one SDPA in fp32 with the causal mask."""
    n, hq, d = q.shape
    hkv = k.shape[2]
    k_all, v_all = (c[table].reshape(-1, hkv, d)[:ctx].float().transpose(0, 1)[None] for c in (k, v))  # [1,Hkv,ctx,D]
    mask = torch.arange(ctx)[None] <= torch.arange(ctx - n, ctx)[:, None]  # [n, ctx]
    out = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k_all, v_all,
                                                           attn_mask=mask, scale=d**-0.5, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, Hq, D]


@amx_chunks
@pytest.mark.parametrize("n, ctx", [(1, 1), (2, 2), (5, 37), (17, 300), (64, 64), (65, 700), (700, 1000)])
@pytest.mark.parametrize("heads", [(32, 2), (32, 4), (16, 16)], ids=["9b", "1m", "groups-of-1"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_the_chunk_kernel_attends_causally(n, ctx, heads, block_size):
    """A prompt chunk or a draft in the chunk kernel: each query sees the context up to its own token, over blocks
    in a shuffled order, the blocks the table leaves out full of nan (never read); spans that cross kv blocks of 256
    tokens and units of 64 queries, and rows of 1, 2 or 16 queries a tile."""
    hq, hkv = heads
    _, k, v, tables, _ = scattered_cache(hq, hkv, 128, block_size, [ctx], torch.bfloat16)
    unused = torch.ones(k.shape[0], dtype=torch.bool)
    unused[tables[0, : -(-ctx // block_size)]] = False
    k[unused], v[unused] = float("nan"), float("nan")
    q = (torch.randn(n, hq, 128, generator=torch.Generator().manual_seed(n)) * 3).to(torch.bfloat16)
    ours = cpu_attention.chunk_attention(q, k, v, tables[0], ctx, 128**-0.5)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert (ours.float() - causal_truth(q, k, v, tables[0], ctx)).abs().max().item() < 1.6e-2


@amx_chunks
def test_the_chunk_kernel_gives_each_of_many_threads_units():
    """With more threads than a span's units of 64 queries, each unit takes fewer queries (whole rows of a tile); the
    numbers do not change."""
    _, k, v, tables, _ = scattered_cache(32, 2, 128, 16, [600], torch.bfloat16)
    q = torch.randn(100, 32, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(7)
        many = cpu_attention.chunk_attention(q, k, v, tables[0], 600, 128**-0.5)
    finally:
        torch.set_num_threads(threads)
    assert (many.float() - causal_truth(q, k, v, tables[0], 600)).abs().max().item() < 1.6e-2
    assert torch.equal(many, cpu_attention.chunk_attention(q, k, v, tables[0], 600, 128**-0.5))


def test_on_amx_cpus_the_chunk_kernel_takes_the_bf16_spans_of_glm4_heads(monkeypatch):
    """The chunk kernel (in the AMX build) takes bf16 spans of heads of 128 in query groups that divide 16 over
    blocks of a multiple of 16 tokens, of any length that gives each thread a row of the tiles; not fp32, other
    heads, groups of 3, blocks of 8, or a span too short for the threads."""
    monkeypatch.setattr(cpu_attention, "amx_spans", lambda: True)
    monkeypatch.setattr(cpu_attention, "builds", lambda: ["amx", "avx512bf16"])
    monkeypatch.setattr(cpu_attention.torch, "get_num_threads", lambda: 2)

    def takes(n, hq, hkv, d=128, block_size=16, dtype=torch.bfloat16, kv_dtype=None):
        cache = torch.empty(1, block_size, hkv, d, dtype=kv_dtype or dtype)
        return cpu_attention.chunk_takes(n, torch.empty(1, hq, d, dtype=dtype), cache)

    assert takes(1, 32, 2) and takes(2048, 32, 2) and takes(300, 32, 4) and takes(5, 16, 16)
    assert takes(64, 32, 2, kv_dtype=torch.float8_e4m3fn)  # --kv-cache-dtype fp8
    assert not takes(64, 32, 2, dtype=torch.float32) and not takes(64, 32, 2, kv_dtype=torch.float32)
    assert not takes(64, 32, 2, d=64) and not takes(64, 24, 8) and not takes(64, 32, 2, block_size=8)
    q = torch.empty(1, 32, 128, dtype=torch.bfloat16)
    assert cpu_attention.takes_span(5000, q, torch.empty(1, 16, 2, 128, dtype=torch.bfloat16))
    monkeypatch.setattr(cpu_attention.torch, "get_num_threads", lambda: 64)
    assert not takes(31, 32, 2) and takes(32, 32, 2)
    assert cpu_attention.takes_span(5, q, torch.empty(1, 16, 2, 128, dtype=torch.bfloat16))  # the decode kernel's AMX


@amx_chunks
def test_on_this_amx_cpu_prompt_chunks_attend_in_the_chunk_kernel(monkeypatch):
    """attention.prefill_attention sends a bf16 chunk of glm-4-9b's heads to the chunk kernel, one call."""
    calls = []
    real = cpu_attention.chunk_attention
    monkeypatch.setattr(cpu_attention, "chunk_attention", lambda *a: calls.append(a) or real(*a))
    _, k, v, tables, _ = scattered_cache(32, 2, 128, 16, [500], torch.bfloat16)
    q = torch.randn(300, 32, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ours = attention.prefill_attention(q, k, v, PrefillSpan(0, 300, 500, tables[0]), 128**-0.5)
    assert len(calls) == 1
    assert (ours.float() - causal_truth(q, k, v, tables[0], 500)).abs().max().item() < 1.6e-2
