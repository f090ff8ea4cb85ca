"""The compiled one-token decode step (model/cpu_decode.py) against transformers and the eager layers."""

from __future__ import annotations

import shutil

import pytest
import torch

from glm4serve.model import cpu_decode, cpu_linear
from glm4serve.model.batch import SeqChunk, build_batch
from glm4serve.model.cpu_linear import packing_available
from glm4serve.model.glm4 import load_model
from glm4serve.model.kv_cache import BlockPool, KVCache

pytestmark = [
    pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear packing"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="inductor needs a C++ compiler"),
]


def decode(model, prompt: list[int], steps: int, one_token: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the decode steps' logits, with or without the compiled layers."""
    saved = model.one_token
    model.one_token = model.one_token if one_token else None
    try:
        kv, pool = KVCache(model.cfg, 64, 4, torch.float32), BlockPool(64, 4)
        table, start, nxt, got, rows = [], 0, prompt, [], []
        for _ in range(steps):
            table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
            with torch.inference_mode():  # as ModelRunner.execute builds it
                b = build_batch([SeqChunk(nxt, start, list(table))], 4)
            logits = model(b.input_ids, b.positions, b.attn, kv, b.logits_indices)[0]
            start += len(nxt)
            rows.append(logits)
            nxt = [int(logits.argmax())]
            got.append(nxt[0])
        return got, torch.stack(rows[1:])  # rows[0] is the prompt's, from the eager layers
    finally:
        model.one_token = saved


@pytest.mark.parametrize("variant,lm_head_in_graph", [("glm", False), ("glm4", False), ("glm", True),
                                                       ("glm4", True)])
def test_one_token_layers_match_eager_and_transformers(make_checkpoint, monkeypatch, variant, lm_head_in_graph):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(variant, "hf", "wide")
    monkeypatch.setattr(cpu_decode, "COMPILED_DECODE_MIN_BYTES", 0)  # compile even this tiny model
    if lm_head_in_graph:  # the output layer keeps a plain copy, which the last graph reads
        monkeypatch.setattr(cpu_linear, "STREAMED_WEIGHT_BYTES", 0)
    ours = load_model(path, dtype=torch.float32, kv_block_size=4)  # decode()'s cache
    assert ours.one_token is not None
    assert (ours.one_token.lm_head_w is not None) == lm_head_in_graph
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    with torch.compiler.set_stance("fail_on_recompile"):  # warm_up compiled for every context length
        got, compiled_logits = decode(ours, prompt, 16, one_token=True)
    eager, eager_logits = decode(ours, prompt, 16, one_token=False)
    assert got == eager
    scale = eager_logits.abs().max().item()
    assert (compiled_logits - eager_logits).abs().max().item() <= 1e-4 * max(scale, 1.0)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert got == expected


def test_attention_in_the_graphs_and_eager_attention_agree_across_the_switch(make_checkpoint, monkeypatch):
    """Contexts up to IN_GRAPH_ATTENTION_MAX_TOKENS attend inside the graphs, longer ones with eager
    SDPA between them: decodes that start in a single cache block and cross the limit match the
    eager layers, with no recompile along the way."""
    monkeypatch.setattr(cpu_decode, "COMPILED_DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "IN_GRAPH_ATTENTION_MAX_TOKENS", 12)
    ours = load_model(make_checkpoint("glm", "hf", "wide"), dtype=torch.float32, kv_block_size=4)
    calls = {"attend_last": 0, "last": 0}
    for name in calls:
        graph = getattr(ours.one_token, name)

        def counted(*args, graph=graph, name=name):
            calls[name] += 1
            return graph(*args)

        setattr(ours.one_token, name, counted)
    for prompt in ([11, 23], [11, 23, 5, 99, 42, 7, 64, 3]):  # 3 and 9 tokens in the cache at the first decode
        with torch.compiler.set_stance("fail_on_recompile"):
            got, compiled_logits = decode(ours, prompt, 16, one_token=True)
        eager, eager_logits = decode(ours, prompt, 16, one_token=False)
        assert got == eager
        assert (compiled_logits - eager_logits).abs().max().item() <= 1e-4 * max(eager_logits.abs().max().item(), 1)
    # 15 decode steps each (the first of 16 is the prompt's): contexts 3..12 and 9..12 attend in
    # the graphs, 13..17 and 13..23 eagerly
    assert calls == {"attend_last": 10 + 4, "last": 5 + 11}


def test_small_models_are_not_compiled(make_checkpoint):
    ours = load_model(make_checkpoint("glm", "hf", "wide"), dtype=torch.float32)
    assert ours.one_token is None  # far below COMPILED_DECODE_MIN_BYTES: packed layers only
    assert ours.layers[0].attn.qkv.plain is None


def test_without_a_compiler_the_eager_layers_serve(make_checkpoint, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_decode, "COMPILED_DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode.torch, "compile", no_compiler)
    ours = load_model(make_checkpoint("glm", "hf", "wide"), dtype=torch.float32)
    assert ours.one_token is None
    got, _ = decode(ours, [1, 2, 3], 4, one_token=False)
    assert len(got) == 4
