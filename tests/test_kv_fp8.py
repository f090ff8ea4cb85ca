"""--kv-cache-dtype fp8: a KV cache of fp8 e4m3 (kv_cache.py), written saturating (attention.store_kv), widened
exactly by the CPU kernels (decode_attention.c's builds, the AMX chunk kernel) and by PyTorch's paths, and served
by the engine with twice bf16's tokens in the same memory."""

from __future__ import annotations

import pytest
import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import EngineArgs, plan_kv_cache
from glm4serve.model import cpu_attention
from glm4serve.model.attention import decode_attention, store_kv
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.glm4 import load_model
from glm4serve.model import kv_cache
from glm4serve.model.kv_cache import FP8, KVCache, bytes_per_token, kv_cache_dtype
from glm4serve.model.runner import make_runner
from tests.paged_caches import scattered_cache
from tests.test_kv_cache import tiny_cfg

kernel = pytest.mark.skipif(cpu_attention._kernel() is None, reason="decode_attention.c does not run here")
amx_chunks = pytest.mark.skipif(cpu_attention.builds()[:1] != ["amx"], reason="the chunk kernel runs in the AMX "
                                "build, on a CPU with AMX-BF16")


def every_fp8(num_blocks, block_size, hkv, d, seed):
    """A cache [num_blocks, block_size, Hkv, D] of e4m3 bytes in a random order, every finite value among them
    (subnormals, zeros of both signs, +-448), then widened by torch: the fp8 cache and its fp32 twin."""
    g = torch.Generator().manual_seed(seed)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    n = num_blocks * block_size * hkv * d
    picks = finite[torch.randint(len(finite), (n,), generator=g)]
    picks[: len(finite)] = finite
    cache = picks[torch.randperm(n, generator=g)].view(FP8).view(num_blocks, block_size, hkv, d)
    return cache, cache.float()


@kernel
@pytest.mark.parametrize("hq, hkv, d, block_size, lens", [(32, 2, 128, 16, [1, 17, 300]), (32, 4, 128, 16, [700]),
                                                          (24, 3, 64, 8, [40, 7]), (12, 4, 256, 64, [65]),
                                                          (8, 2, 40, 4, [9, 50])])
def test_the_kernels_widen_fp8_exactly(hq, hkv, d, block_size, lens):
    """Over every finite e4m3 value, each build's fp32 queries read the fp8 cache as they read its fp32 widening:
    the same bits; and the AMX build's bf16 queries as they read its bf16 widening (exact: e4m3 has 3 mantissa
    bits), wherever its tiles take the cache."""
    q, _, _, tables, ctx = scattered_cache(hq, hkv, d, block_size, lens, torch.float32)
    num_blocks = int(tables.max()) + 1
    k8, k32 = every_fp8(num_blocks, block_size, hkv, d, seed=1)
    v8, v32 = every_fp8(num_blocks, block_size, hkv, d, seed=2)
    scale = 1e-3  # keeps most scores from saturating the softmax, so that the values' widening shows
    for build in cpu_attention.builds():
        ours = cpu_attention.decode_attention(q, k8, v8, tables, ctx, scale, build=build)
        assert torch.equal(ours, cpu_attention.decode_attention(q, k32, v32, tables, ctx, scale, build=build)), build
    qb = q.to(torch.bfloat16)
    if cpu_attention.builds()[:1] == ["amx"] and cpu_attention.amx_takes(qb, k8):
        kb, vb = k32.to(torch.bfloat16), v32.to(torch.bfloat16)
        ours = cpu_attention.decode_attention(qb, k8, v8, tables, ctx, scale, build="amx")
        assert torch.equal(ours, cpu_attention.decode_attention(qb, kb, vb, tables, ctx, scale, build="amx"))


@kernel
@pytest.mark.parametrize("lens, kv_heads, block_size", [([1, 16, 17, 300], 2, 16), ([5, 2000], 4, 16),
                                                        ([3, 70], 2, 8)], ids=["9b", "1m", "blocks-of-8"])
@pytest.mark.parametrize("n", [1, 5], ids=["decode", "span"])
def test_bf16_queries_over_fp8_caches_equal_pytorch_in_every_build(lens, kv_heads, block_size, n):
    """bf16 queries (a bf16 model's) over an fp8 cache, decodes and a draft-like span, in each build (the
    avx512bf16 and avx512 builds widen fp8 to fp32; the AMX build to bf16 for its tiles, or to fp32 in blocks its
    tiles do not take): PyTorch's attention over the cache widened to fp32, within bf16's rounding of the output and
    the weights."""
    q, k, v, tables, ctx = scattered_cache(32, kv_heads, 128, block_size, lens, torch.float32, q_scale=3)
    k8, v8 = k.to(FP8), v.to(FP8)
    q = q.to(torch.bfloat16)
    for build in cpu_attention.builds():
        if n == 1:
            ours = cpu_attention.decode_attention(q, k8, v8, tables, ctx, 128**-0.5, build=build)
            truth = decode_attention(q.float(), k8.float(), v8.float(), tables, ctx, 128**-0.5)
        else:
            span = q[-1:].repeat(n, 1, 1)
            last = int(ctx[-1])
            ours = cpu_attention.span_attention(span, k8, v8, tables[-1], last, 128**-0.5, build=build)
            truth = decode_attention(span.float(), k8.float(), v8.float(), tables[-1:].repeat(n, 1),
                                     torch.arange(last - n + 1, last + 1), 128**-0.5)
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - truth).abs().max().item() < 1.6e-2, build


@amx_chunks
@pytest.mark.parametrize("n, ctx", [(17, 300), (700, 1000)])
def test_the_chunk_kernel_widens_fp8_exactly(n, ctx):
    """A prompt chunk over an fp8 cache in the AMX chunk kernel: the bits of the same chunk over the cache widened
    to bf16; blocks the table leaves out hold e4m3's nan bytes, never read."""
    _, _, _, tables, _ = scattered_cache(32, 2, 128, 16, [ctx], torch.float32)
    k8, k32 = every_fp8(int(tables.max()) + 1, 16, 2, 128, seed=3)
    v8, v32 = every_fp8(int(tables.max()) + 1, 16, 2, 128, seed=4)
    unused = torch.ones(k8.shape[0], dtype=torch.bool)
    unused[tables[0, : -(-ctx // 16)]] = False
    for cache in (k8, v8):
        cache.view(torch.uint8)[unused] = 0x7F  # nan
    q = (torch.randn(n, 32, 128, generator=torch.Generator().manual_seed(n)) * 3).to(torch.bfloat16)
    assert cpu_attention.chunk_takes(n, q, k8)
    ours = cpu_attention.chunk_attention(q, k8, v8, tables[0], ctx, 1e-3)
    kb, vb = k32.to(torch.bfloat16), v32.to(torch.bfloat16)
    assert torch.equal(ours, cpu_attention.chunk_attention(q, kb, vb, tables[0], ctx, 1e-3))
    assert not ours.isnan().any()


def test_writes_saturate_at_e4m3s_range_and_copy_blocks_moves_bytes():
    """store_kv casts to e4m3 (round to nearest), saturating past +-448; nan and inf as 0 where asked, else inf
    saturates too; copy_blocks copies fp8 blocks (index_copy_ has no fp8 kernel on CPU, so both go as bytes)."""
    kv = KVCache(tiny_cfg(), 4, 2, FP8)
    k = torch.tensor([1000.0, -1e9, 0.3, float("inf"), float("nan"), 1e-4, 2**-9, -5.0])[None, None].repeat(3, 2, 2)
    v = -k
    slots = torch.tensor([0, 3, 6])
    store_kv(kv.k_slots[0], kv.v_slots[0], k, v, slots, finite=True)
    row = kv.k[0].view(-1, 2, 16)[3, 1].float()
    want = torch.tensor([448.0, -448.0, 0.3, 0.0, 0.0, 1e-4, 2**-9, -5.0]).to(FP8).float()
    assert torch.equal(row[:8], want) and torch.equal(row[8:], want)
    assert torch.equal(kv.v[0].view(-1, 2, 16)[3, 1].float()[:8], -want)
    assert kv.k[0].view(-1, 2, 16)[[1, 2, 4, 5, 7]].float().eq(0).all()  # nothing else written
    kv.copy_blocks([(1, 2)])  # slots 2, 3 -> 4, 5
    assert torch.equal(kv.k[0][2].view(torch.uint8), kv.k[0][1].view(torch.uint8))
    store_kv(kv.k_slots[1], kv.v_slots[1], torch.full((1, 2, 16), float("-inf")), k[:1], slots[:1], finite=False)
    assert kv.k[1][0, 0].float().eq(-448).all()
    assert kv.nbytes == 2 * 2 * 4 * 2 * 2 * 16  # k and v, layers, blocks, block size, KV heads, D: a byte each


def test_a_prompt_whose_values_pass_e4m3s_range_is_logged_once(caplog):
    """A chunk of several tokens with a K or V element past +-448 logs a warning, once per process; values within
    the range, and decodes (one token, not checked: a step's cost), log nothing."""
    kv_cache._warn_saturated.cache_clear()
    kv = KVCache(tiny_cfg(), 4, 2, FP8)
    ok, big = torch.full((2, 2, 16), 448.0), torch.full((2, 2, 16), 1.0)
    big[1, 0, 3] = -449.0
    with caplog.at_level("WARNING", logger="glm4serve.model.kv_cache"):
        store_kv(kv.k_slots[0], kv.v_slots[0], ok, ok, torch.tensor([0, 1]), finite=True)
        store_kv(kv.k_slots[0], kv.v_slots[0], big[1:], big[1:], torch.tensor([2]), finite=True)
        assert not caplog.records
        store_kv(kv.k_slots[0], kv.v_slots[0], ok, big, torch.tensor([0, 1]), finite=True)
        store_kv(kv.k_slots[1], kv.v_slots[1], big, ok, torch.tensor([0, 1]), finite=True)
    assert len(caplog.records) == 1 and "--kv-cache-dtype auto" in caplog.text
    kv_cache._warn_saturated.cache_clear()


def test_an_fp8_cache_holds_twice_bf16s_tokens_in_the_same_budget():
    cfg = tiny_cfg()
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16 and kv_cache_dtype("fp8", torch.float32) == FP8
    assert kv_cache_dtype("fp8_e4m3", torch.bfloat16) == FP8
    bf16, fp8 = bytes_per_token(cfg, torch.bfloat16), bytes_per_token(cfg, FP8)
    assert bf16 == 2 * fp8
    args = EngineArgs(model="m", block_size=16, kv_cache_memory=10 * 16 * bf16)
    assert plan_kv_cache(args, 4096, fp8, "cpu").num_blocks == 2 * plan_kv_cache(args, 4096, bf16, "cpu").num_blocks


def test_the_setting_takes_vllms_fp8_names_and_refuses_others():
    assert EngineArgs(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    assert EngineArgs(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    for other in ("fp8_e5m2", "int8", "bfloat16x"):
        with pytest.raises(ValueError):
            EngineArgs(kv_cache_dtype=other)


def forced_logits(runner, prompt: list[int], then: list[int]) -> torch.Tensor:
    """Logits [1 + len(then), V]: the prompt's last, then each decode step's, fed the tokens `then`."""
    pool = BlockPool(runner.num_blocks, runner.block_size)
    table, start, rows = [], 0, []
    for nxt in [prompt, *([t] for t in then)]:
        table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
        rows.append(runner.execute(ScheduledBatch([SeqChunk(nxt, start, list(table))]))[0])
        start += len(nxt)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_model_over_an_fp8_cache_reads_it_alike_in_the_kernels_and_in_pytorch(make_checkpoint, monkeypatch, dtype):
    """The CPU runner over an fp8 cache, a prompt and then decodes of the same tokens: the C kernels and PyTorch's paths
    (gather, widen, SDPA) give the same logits (sums in other orders), and both stay near the same model over a cache
    of its own dtype (e4m3 keeps ~2 significant digits of each K and V element)."""
    path = make_checkpoint("glm4", "hf", "gqa128")
    prompt = [(7 * i + 3) % 500 for i in range(40)]

    def logits(kv_dtype, kernels=True):
        with monkeypatch.context() as m:
            if not kernels:
                m.setattr(cpu_attention, "runs", lambda q, k_cache: False)
            runner = make_runner(load_model(path, dtype=dtype), 32, 16, kv_dtype=kv_dtype)
            assert runner.kv.k[0].dtype == (kv_dtype or dtype)
            return forced_logits(runner, prompt, [11, 400, 23, 5, 99])

    fp8, fp8_pytorch, full = logits(FP8), logits(FP8, kernels=False), logits(None)
    scale = full.abs().max().item()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert (fp8 - fp8_pytorch).abs().max().item() <= tol * scale
    assert (fp8 - full).abs().max().item() <= 0.1 * scale
    assert (fp8 - full).abs().max().item() > 0  # the cache did hold fp8


def test_a_gpu_kv_cache_of_fp8_is_refused_at_load():
    """The GPU's decode kernel reads the model's dtype: fp8 is refused before any cache is made (a model whose
    parameters lie off the CPU stands for one on a GPU)."""

    class OffCpu(torch.nn.Module):
        def parameters(self, recurse=True):
            yield torch.empty(0, device="meta", dtype=torch.bfloat16)

    with pytest.raises(ValueError, match="CPU only"):
        make_runner(OffCpu(), 4, 16, kv_dtype=FP8)
