"""Weight-only int8/int4 (model/quant.py): quantized while loading, within half a step of the
checkpoint's weights, the same greedy tokens as plain PyTorch over the same dequantized weights,
and a load that never holds the weights in full precision."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.cpu_runner import CpuRunner
from glm4serve.model.glm4 import load_model
from glm4serve.model.quant import Int4Linear, Int8Linear
from glm4serve.model.runner import EagerRunner
from glm4serve.server import build_llm_engine

SCHEMES = ["int8", "int4"]


def quantized_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


@pytest.mark.parametrize("layout", ["hf", "chatglm"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_linear_is_quantized_within_half_a_step(make_checkpoint, scheme, layout):
    path = make_checkpoint("glm", layout, "wide")
    plain = load_model(path, dtype=torch.float32)
    quantized = quantized_linears(load_model(path, dtype=torch.float32, quantization=scheme))
    assert len(quantized) == 1 + 4 * plain.cfg.num_layers  # the output layer too
    for name, q in quantized.items():
        w = plain.get_submodule(name).weight  # [out, in]
        if scheme == "int8":  # a step per row: its largest |w| / 127, rounded to bf16 (2^-9 relative)
            bound = (w.abs().amax(1) / 127 / 2)[:, None] * (1 + 2**-8)
        else:  # a step per group of inputs: its range / 15; scale and zero point are bf16 (2^-9 relative)
            groups = w.view(w.shape[0], -1, q.group)
            low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
            bound = (step / 2 + 2**-8 * (low.abs() + 8 * step)).repeat_interleave(q.group, dim=1)
        assert ((q.dequantized() - w).abs() <= bound).all(), name
        if q.bias is not None:
            assert torch.equal(q.bias, plain.get_submodule(name).bias)


class BF16InputLinear(nn.Linear):
    """Plain PyTorch over a quantized linear's dequantized weight, in fp32 between the bf16 input and
    output that the quantized kernels take and give."""

    def forward(self, x):
        y = super().forward(x.to(torch.bfloat16).float())
        return (y if self.bias is None else y - self.bias).to(torch.bfloat16).to(x.dtype) + (
            0 if self.bias is None else self.bias)


def dequantized_model(path, scheme):
    """The model with every quantized linear replaced by plain nn.Linear over its dequantized weight."""
    model = load_model(path, dtype=torch.float32, quantization=scheme)
    for name, q in quantized_linears(model).items():
        parent, _, attr = name.rpartition(".")
        plain = BF16InputLinear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(q.dequantized())
            if q.bias is not None:
                plain.bias.copy_(q.bias)
        setattr(model.get_submodule(parent) if parent else model, attr, plain)
    return model


def greedy_tokens(runner, prompt, steps, block_size=4):
    pool = BlockPool(runner.num_blocks, block_size)
    table, start, nxt, got = [], 0, prompt, []
    for _ in range(steps):
        table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
        logits = runner.execute(ScheduledBatch([SeqChunk(nxt, start, list(table))]))[0]
        start += len(nxt)
        nxt = [int(logits.argmax())]
        got.append(nxt[0])
    return got


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_greedy_tokens_equal_plain_pytorch_over_the_dequantized_weights(make_checkpoint, scheme):
    path = make_checkpoint("glm4", "hf", "wide")
    engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", quantization=scheme, num_kv_blocks=64,
                                         block_size=4))
    assert isinstance(engine.runner, CpuRunner)
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    engine.add_request("q", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    got = []
    while engine.has_work:
        got += [t for o in engine.step() for t in o.token_ids]
    reference = EagerRunner(dequantized_model(path, scheme), 64, 4, vocab_limit=engine.tokenizer.vocab_size)
    want = greedy_tokens(reference, prompt, 16)
    assert got == want


LOAD_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    torch.set_num_threads(2)
    from safetensors import safe_open
    from glm4serve.model.glm4 import load_model
    from glm4serve.model.cpu_runner import nbytes
    import glm4serve.model.loader, glm4serve.model.quant  # imported here, not counted as the load's

    def anon_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    path, scheme = sys.argv[1], sys.argv[2]
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        largest = max(f.get_slice(n).get_shape()[0] * f.get_slice(n).get_shape()[1] * 2
                      for n in f.keys() if len(f.get_slice(n).get_shape()) == 2)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_bytes())
            time.sleep(0.0005)

    before = anon_bytes()
    threading.Thread(target=sample, daemon=True).start()
    model = load_model(path, dtype="bfloat16", quantization=scheme)
    done.set()
    print(json.dumps({"grew": peak[0] - before, "weights": nbytes(model), "largest_tensor": largest}))
""")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loading_holds_the_quantized_weights_and_one_tensor_at_most(tmp_path, scheme):
    """A bf16 checkpoint loads straight into int8/int4: the process grows by the final weights plus
    one checkpoint tensor, never by the bf16 weights in full."""
    import json

    from glm4serve.model.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", variant="glm", layout="hf", hidden_size=1024,
                                   intermediate_size=4096, num_layers=4, num_heads=8, num_kv_heads=2,
                                   head_dim=128, dtype="bfloat16", num_merges=200)
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path), scheme], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    bf16_linears = 4 * 2 * 1024 * (1024 + 512 + 1024 + 2 * 4096 + 4096)  # what a bf16 load would hold
    assert m["weights"] < bf16_linears / 1.9  # int8 at most half, int4 about a quarter
    slack = 16 << 20  # the reader's and allocator's own
    assert m["grew"] <= m["weights"] + m["largest_tensor"] + slack, m
