"""128K-context mechanics: rotary at large positions, and a prefill whose memory does not grow
with the square of its length; on a GPU (`--device cuda`) the CUDA prefill path itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import GlmConfig
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding, apply_rotary_pos_emb

from glm4serve.engine.config import GPU_MEMORY_FRACTION, EngineArgs, plan_kv_cache
from glm4serve.model import attention, cpu_attention
from glm4serve.model.attention import PrefillSpan, causal_attention_gpu, prefill_attention
from glm4serve.model.batch import SeqChunk, build_batch
from glm4serve.model.config import ModelConfig
from glm4serve.model.glm4 import GLM4Model, Rotary, rotate
from glm4serve.model.kv_cache import KVCache, bytes_per_token
from glm4serve.model.loader import param_shapes
from shared_models import SHARED_MODELS


def test_rotary_matches_transformers_up_to_position_131071(device):
    hf_cfg = GlmConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    hf_rot = GlmRotaryEmbedding(hf_cfg).to(device)
    ours = Rotary(64, 5e6, 128).to(device)
    positions = torch.tensor([0, 1, 7, 4095, 32768, 65535, 100000, 131070, 131071], device=device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 32, 128, generator=g).to(device)  # [T, heads, D]
    k = torch.randn(len(positions), 2, 128, generator=g).to(device)
    cos, sin = hf_rot(q, positions[None])
    # transformers wants [batch, heads, T, D]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_ours, sin_ours = ours(positions)
    q_ours, k_ours = rotate(q, cos_ours, sin_ours), rotate(k, cos_ours, sin_ours)
    torch.testing.assert_close(q_ours, q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # the second half of each head passes through untouched
    assert torch.equal(q_ours[..., 64:], q[..., 64:])


def test_rotary_of_the_1m_model_matches_transformers_past_position_1m(device):
    """glm-4-9b-chat-1m: rope_ratio 10000 (base 1e8), positions up to 1,048,575."""
    hf_cfg = GlmConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 1e8, "partial_rotary_factor": 0.5})
    hf_rot = GlmRotaryEmbedding(hf_cfg).to(device)
    ours = Rotary(64, 1e8, 128).to(device)
    positions = torch.tensor([0, 131071, 131072, 524288, 1000000, 1048574, 1048575], device=device)
    q = torch.randn(len(positions), 32, 128, generator=torch.Generator().manual_seed(1)).to(device)  # [T, heads, D]
    cos, sin = hf_rot(q, positions[None])
    q_ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    cos_ours, sin_ours = ours(positions)
    torch.testing.assert_close(rotate(q, cos_ours, sin_ours), q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_1m_context_fits_an_h200_next_to_the_weights():
    """glm-4-9b-chat-1m's real config: 80 KiB of K/V per token, so 1,048,576 tokens take 80 GiB; with
    its bf16 weights that is within the automatic budget (90% of the card) of a 141 GB H200."""
    d = SHARED_MODELS / "glm-4-9b-chat-1m"
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} not present")
    cfg = ModelConfig.from_dir(d)
    assert cfg.max_position_embeddings == 1048576 and cfg.rope_theta == 1e8 and cfg.num_kv_heads == 4
    per_token = bytes_per_token(cfg, torch.bfloat16)
    assert per_token == 80 * 1024
    weights = 2 * sum(t.numel() for t in (torch.empty(s, device="meta") for s in param_shapes(cfg).values()))
    card = 141e9  # an H200's HBM3e; torch reports ~139.8 GiB of it
    budget = int(card * GPU_MEMORY_FRACTION) - weights  # kv_budget() once the weights are loaded
    plan = plan_kv_cache(EngineArgs(model=str(d), kv_cache_memory=budget), cfg.max_position_embeddings, per_token,
                         "cuda")
    assert plan.max_model_len == 1048576, plan


MEMORY_PROBE = textwrap.dedent(
    """
    import resource, torch
    torch.set_num_threads(2)
    from glm4serve.model.config import ModelConfig
    from glm4serve.model.glm4 import GLM4Model
    from glm4serve.model.kv_cache import KVCache
    from glm4serve.model.batch import SeqChunk, build_batch
    n = {n}
    cfg = ModelConfig(variant="glm", layout="hf", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=5e6)
    model = GLM4Model(cfg).eval()
    kv = KVCache(cfg, n // 16 + 1, 16, torch.float32)
    for t in kv.k + kv.v:
        t.fill_(0.0)  # touch every page so the cache counts in the baseline
    b = build_batch([SeqChunk(list(range(n)), 0, list(range(n // 16 + 1)))], 16)  # ONE span of n tokens
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = model(b.input_ids % 256, b.positions, b.attn, kv, b.logits_indices)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(logits).all()
    print((after - before) * 1024)
    """
)


def test_long_prefill_memory_is_not_quadratic():
    n = 8192
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(n=n)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.strip().splitlines()[-1])
    full_scores = 4 * n * n * 4  # heads x n x n fp32 = 1 GiB for one unchunked span
    assert grew < 300 * 2**20, f"prefill of {n} tokens grew the process by {grew / 2**20:.0f} MiB"
    assert grew < full_scores / 3


def random_span(n: int, ctx: int, hq: int, hkv: int, d: int, block_size: int):
    """Queries [n, hq, d] of a span ending a context of ctx tokens, over random K/V caches (3 spare
    blocks) and a shuffled block table covering the context."""
    g = torch.Generator().manual_seed(0)
    nb = -(-ctx // block_size)
    k_cache = torch.randn(nb + 3, block_size, hkv, d, generator=g)
    v_cache = torch.randn(nb + 3, block_size, hkv, d, generator=g)
    table = torch.randperm(nb + 3, generator=g)[:nb]
    return torch.randn(n, hq, d, generator=g), k_cache, v_cache, table


@pytest.fixture
def pytorch_spans(monkeypatch):
    """Short spans on CPU attend in PyTorch (query tiles, or folded query groups), as on a CPU without the kernel,
    where decode_attention.c does not run (test_cpu_attention.py tests the kernel's spans)."""
    monkeypatch.setattr(cpu_attention, "runs", lambda q, k_cache: False)


def tiled_and_flag_causal(n: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random span's attention [n, 8, 16] (2 KV heads, `past` cached tokens before it), by the
    CPU path (query tiles, boolean masks) and by causal_attention_gpu (one call, the causal flag
    aligned to the last key), both run here."""
    hq, hkv, d, ctx = 8, 2, 16, past + n
    q, k_cache, v_cache, table = random_span(n, ctx, hq, hkv, d, block_size=4)
    tiled = prefill_attention(q, k_cache, v_cache, PrefillSpan(0, n, ctx, table), 0.25)
    k_all = k_cache[table].view(-1, hkv, d)[:ctx].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
    v_all = v_cache[table].view(-1, hkv, d)[:ctx].transpose(0, 1)[None]
    return tiled, causal_attention_gpu(q.transpose(0, 1)[None], k_all, v_all, 0.25)[0].transpose(0, 1)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("past", [0, 37])
def test_gpu_causal_path_equals_the_tiled_cpu_path(past, flash, monkeypatch, pytorch_spans):
    """The CUDA branch of prefill attention (flag-causal, aligned to the last key; GQA heads shared
    where flash runs, repeated where it cannot) gives the tiled boolean-mask path's numbers; run
    here on CPU, where SDPA builds the flag's mask and either branch can be taken."""
    monkeypatch.setattr(attention, "can_use_flash_attention", lambda params: flash)
    tiled, fused = tiled_and_flag_causal(50, past)
    torch.testing.assert_close(fused, tiled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("past", [0, 37])
def test_gpu_causal_path_keeps_sdpa_off_cudnn(past, flash, monkeypatch, pytorch_spans):
    """cuDNN's attention builds a graph for each new length (hundreds of ms): the prefill path leaves
    SDPA's other kernels to choose from, a span without cached prefix (plain causal SDPA) included,
    and gives the choice back afterwards."""
    monkeypatch.setattr(attention, "can_use_flash_attention", lambda params: flash)
    sdpa, seen = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    tiled, fused = tiled_and_flag_causal(20, past)
    torch.testing.assert_close(fused, tiled, atol=1e-5, rtol=1e-5)
    assert seen and seen[-1] == (False, True)  # the last call: causal_attention_gpu's
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("past", [0, 37])
@pytest.mark.parametrize("query_tile, score_budget", [(256, attention.SCORE_BUDGET), (10**6, 100 * 650)])
def test_prefill_in_query_tiles_equals_one_causal_attention(past, query_tile, score_budget, monkeypatch):
    """A span of 600 queries cut into tiles, by QUERY_TILE (256, 256, 88) or by the score budget
    (~100 each), gives the numbers of one attention over the whole span with the causal mask."""
    monkeypatch.setattr(attention, "QUERY_TILE", query_tile)
    monkeypatch.setattr(attention, "SCORE_BUDGET", score_budget)
    tiled, whole = tiled_and_flag_causal(600, past)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 5, 32])
@pytest.mark.parametrize("past", [0, 37])
def test_short_spans_fold_the_query_groups_and_equal_one_causal_attention(n, past, monkeypatch, pytorch_spans):
    """A draft or a short chunk (at most FOLD_MAX_QUERIES queries) runs as G x n rows of each KV head."""
    folds = []
    fold = attention.folded_span_attention
    monkeypatch.setattr(attention, "folded_span_attention", lambda *a: folds.append(1) or fold(*a))
    folded, whole = tiled_and_flag_causal(n, past)
    assert folds == [1]
    torch.testing.assert_close(folded, whole, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attention, "SCORE_BUDGET", 4 * n * (past + n) - 1)  # 4 query heads per KV head
    tiled, whole = tiled_and_flag_causal(n, past)
    assert folds == [1]  # its folded mask would pass the score budget: query tiles instead
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("past", [0, 37])
def test_cuda_prefill_attention_equals_the_tiled_cpu_path(past, dtype, tolerances):
    """prefill_attention on the GPU (SDPA's flash or memory-efficient kernels, as the dtype allows)
    against the tiled CPU path in float32, with glm-4-9b's heads (32 over 2 KV heads of 128)."""
    n, hq, hkv, d = 300, 32, 2, 128
    ctx = past + n
    q, k_cache, v_cache, table = random_span(n, ctx, hq, hkv, d, block_size=16)
    scale = d**-0.5
    truth = prefill_attention(q, k_cache, v_cache, PrefillSpan(0, n, ctx, table), scale)

    def attend(device, dt):
        x = [t.to(device, getattr(torch, dt)) for t in (q, k_cache, v_cache)]
        return prefill_attention(*x, PrefillSpan(0, n, ctx, table.to(device)), scale)

    same = None if dtype == "float32" else attend("cpu", dtype)  # what the dtype's rounding alone costs
    tolerances[dtype].assert_close(attend("cuda", dtype), truth, same)


def reference_flash_varlen(q, k, v, packed, scale):
    """What flash's varlen kernel computes, span by span in SDPA (CPU): causal aligned to the last key."""
    out, cu_q, cu_k = [], packed.cu_q.tolist(), packed.cu_k.tolist()
    for i in range(len(cu_q) - 1):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t, a, b in  # [1, heads, len, D]
                      ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
        g = qi.shape[1] // ki.shape[1]
        ki, vi = ki.repeat_interleave(g, dim=1), vi.repeat_interleave(g, dim=1)
        mask = causal_lower_right(qi.shape[2], ki.shape[2])
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


def test_packed_prefill_spans_equal_one_attention_per_span(device, monkeypatch):
    """A step of three prompt chunks (one after 37 cached tokens, one of 2 tokens) and two decodes, in
    one varlen flash call against one attention per span: the same output for every token. On CPU the
    kernel is stood in for by SDPA span by span (what packs the spans is what is tested there); on
    a GPU (--device cuda), flash's own kernel in bf16. glm-4-9b's heads: 32 over 2 KV heads of 128."""
    hq, hkv, d, bs, blocks = 32, 2, 128, 16, 24
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        monkeypatch.setattr(attention, "flash_varlen", reference_flash_varlen)
        monkeypatch.setattr(attention, "flash_varlen_runs", lambda q: True)
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(blocks, bs, hkv, d, generator=g).to(device, dt) for _ in range(2))
    tables = torch.randperm(blocks, generator=g).view(4, 6).tolist()  # 6 blocks (96 tokens) each
    chunks = [SeqChunk([1] * 20, 0, tables[0]), SeqChunk([2], 49, tables[1]), SeqChunk([3] * 45, 37, tables[2]),
              SeqChunk([4] * 2, 0, tables[3]), SeqChunk([5], 8, tables[0][3:])]
    q = torch.randn(sum(len(c.token_ids) for c in chunks), hq, d, generator=g).to(device, dt)
    assert attention.flash_varlen_runs(q)  # on a GPU: this card runs flash, or nothing here is tested
    packed = build_batch(chunks, bs, device, pack_prefills=True).attn
    by_span = build_batch(chunks, bs, device, pack_prefills=False).attn
    assert packed.packed is not None and by_span.packed is None and packed.num_prefill_tokens == 67
    got = attention.cached_attention(q, k_cache, v_cache, packed, d**-0.5)
    want = attention.cached_attention(q, k_cache, v_cache, by_span, d**-0.5)
    tol = dict(atol=2e-2, rtol=2e-2) if dt == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.cuda
def test_long_prefill_gpu_memory_is_not_quadratic(dtype):
    n = 32768
    cfg = ModelConfig(variant="glm", layout="hf", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=5e6)
    model = GLM4Model(cfg).to("cuda", getattr(torch, dtype)).eval()
    model.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.head_dim).cuda()  # fp32 angles, as load_model keeps them
    blocks = n // 16 + 1
    kv = KVCache(cfg, blocks, 16, getattr(torch, dtype), "cuda")
    b = build_batch([SeqChunk(list(range(n)), 0, list(range(blocks)))], 16, "cuda")  # ONE span of n tokens
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = model(b.input_ids % 256, b.positions, b.attn, kv, b.logits_indices)
    grew = torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(logits).all()
    # heads x n x n fp32 scores would be 16 GiB; flash and memory-efficient SDPA build none of them
    assert grew < 256 * 2**20, f"prefill of {n} tokens took {grew / 2**20:.0f} MiB of GPU memory"
