"""fp32 CPU linears (model/cpu_linear.py): oneDNN-packed for batches, a compiled one-row kernel for
weights too big for the cache. Both must give F.linear's numbers."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm4serve.model import cpu_linear
from glm4serve.model.cpu_linear import PackedLinear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear packing")
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="inductor needs a C++ compiler")


def linear(out_f: int, in_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def assert_close(got: torch.Tensor, want: torch.Tensor):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_packed_equals_f_linear(bias, rows):
    lin = linear(96, 64, bias)
    packed = PackedLinear(lin)
    assert packed.plain is None  # small: no plain copy, no compiled kernel
    x = torch.randn(rows, 64)
    assert_close(packed(x), F.linear(x, lin.weight, lin.bias))


@needs_compiler
@pytest.mark.parametrize("bias", [False, True])
def test_streamed_weight_uses_one_row_kernel_for_one_row_only(bias):
    lin = linear(200, 48, bias, seed=1)
    packed = PackedLinear(lin, streamed_weight_bytes=0)  # treat this weight as too big for cache
    assert packed.plain is not None and packed.one_row is not None
    calls = []
    kernel = packed.one_row
    packed.one_row = lambda w, x: calls.append(x.shape) or kernel(w, x)
    with torch.inference_mode():
        for rows in (1, 2, 1, 17):
            x = torch.randn(rows, 48)
            assert_close(packed(x), F.linear(x, lin.weight, lin.bias))
    assert calls == [torch.Size([1, 48])] * 2  # batches of several rows went through oneDNN


@needs_compiler
def test_model_with_a_streamed_output_layer_matches_transformers_generate(make_checkpoint, monkeypatch):
    """Greedy decode through the one-row output-layer kernel equals transformers generate(); the
    other layers never get a plain copy, however big."""
    from transformers import AutoModelForCausalLM

    from glm4serve.model.batch import SeqChunk, build_batch
    from glm4serve.model.glm4 import load_model
    from glm4serve.model.kv_cache import BlockPool, KVCache

    path = make_checkpoint("glm", "hf", "wide")
    monkeypatch.setattr(cpu_linear, "STREAMED_WEIGHT_BYTES", 0)
    ours = load_model(path, dtype=torch.float32)
    assert isinstance(ours.lm_head, PackedLinear) and ours.lm_head.plain is not None
    assert all(m.plain is None for m in ours.layers.modules() if isinstance(m, PackedLinear))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    kv, pool = KVCache(ours.cfg, 64, 4, torch.float32), BlockPool(64, 4)
    table, start, nxt, got = [], 0, prompt, []
    for _ in range(16):
        table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
        b = build_batch([SeqChunk(nxt, start, list(table))], 4)
        tok = int(ours(b.input_ids, b.positions, b.attn, kv, b.logits_indices)[0].argmax())
        start += len(nxt)
        got.append(tok)
        nxt = [tok]
    assert got == expected


def test_hugepage_copy_is_an_equal_tensor_that_outlives_its_source():
    import gc

    from glm4serve.model.cpu_linear import hugepage_copy

    src = torch.randn(300, 700)
    copy = hugepage_copy(src)
    want = src.clone()
    del src
    gc.collect()
    assert copy.is_contiguous() and copy.shape == (300, 700) and copy.data_ptr() % (2 << 20) == 0
    assert torch.equal(copy, want)


def test_without_a_compiler_the_big_weight_falls_back_to_onednn(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_linear.torch, "compile", no_compiler)
    lin = linear(200, 48, bias=True, seed=2)
    packed = PackedLinear(lin, streamed_weight_bytes=0)
    assert packed.plain is None and packed.one_row is None
    x = torch.randn(1, 48)
    assert_close(packed(x), F.linear(x, lin.weight, lin.bias))
