"""decode_attention.c (cpu_attention.py): one query per sequence over its paged K/V, read in place, against
PyTorch's decode attention (attention.decode_attention), in each build the CPU runs."""

from __future__ import annotations

import pytest
import torch

from glm4serve.model import attention, cpu_attention
from glm4serve.model.attention import decode_attention
from glm4serve.model.batch import SeqChunk, build_batch
from tests.paged_caches import scattered_cache

pytestmark = pytest.mark.skipif(cpu_attention._kernel() is None, reason="decode_attention.c does not run here "
                                "(no AVX-512, or no C compiler)")

# (query heads, KV heads, head dim, block size, context lengths): glm-4-9b's 32 over 2 heads of 128;
# glm-4-9b-chat-1m's groups of 8; 64 over 2 (two units of 16 lanes a KV head); multi-head (groups of 1);
# groups of 3 (lanes left over); head sizes 16 to 256; blocks of 1, 4 and 64; lengths of 1, at and
# across block edges, and long enough to be split.
CASES = [
    (32, 2, 128, 16, [1, 16, 17, 300]),
    (32, 4, 128, 16, [5, 2000]),
    (64, 2, 64, 8, [9, 129]),
    (4, 4, 32, 4, [3, 200, 1]),
    (6, 2, 16, 1, [1, 2, 40]),
    (12, 4, 256, 64, [63, 64, 65, 700]),
]


def pytorch_truth(q, k, v, tables, lens):
    mask = torch.arange(tables.shape[1] * k.shape[1])[None, :] < lens[:, None]
    return decode_attention(q.float(), k.float(), v.float(), tables, mask, q.shape[-1] ** -0.5)


@pytest.fixture(params=cpu_attention.builds())
def build(request):
    """Each build this CPU runs (AVX-512 BF16's, AVX-512's)."""
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
    """Keys past a sequence's length (the rest of its last block, and blocks the table does not list)
    are never read: filling them with nan changes nothing."""
    q, k, v, tables, ctx = scattered_cache(32, 2, 128, 16, [20, 70], torch.bfloat16)
    before = cpu_attention.decode_attention(q, k, v, tables, ctx, 0.1, build=build)
    used = {(int(tables[i, p // 16]), p % 16) for i, n in enumerate(ctx.tolist()) for p in range(n)}
    for blk in range(k.shape[0]):
        for slot in range(16):
            if (blk, slot) not in used:
                k[blk, slot], v[blk, slot] = float("nan"), float("nan")
    after = cpu_attention.decode_attention(q, k, v, tables, ctx, 0.1, build=build)
    assert torch.equal(before, after)


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
    truth = decode_attention(q, k, v, batch.decode_block_tables, batch.decode_mask, 64**-0.5)
    assert (ours - truth).abs().max().item() < 2e-6


def test_splits_give_each_thread_a_few_units():
    assert cpu_attention.splits_for(2, 16384, 2) == 8  # one sequence of glm-4-9b: its 2 KV heads, 8 parts each
    assert cpu_attention.splits_for(2, 300, 2) == 2  # no split under MIN_SPLIT_TOKENS
    assert cpu_attention.splits_for(2, 50, 2) == 1
    assert cpu_attention.splits_for(128, 16384, 2) == 1  # 64 sequences: already 64 units a thread
    assert cpu_attention.splits_for(1, 1 << 20, 64) == cpu_attention.MAX_SPLITS
