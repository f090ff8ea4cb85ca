"""The CPU runner (model/cpu_runner.py): its compiled one-token decode step against transformers and
the eager layers, and how it chooses its path at load."""

from __future__ import annotations

import pytest
import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.model import bf16_kernel, cpu_linear, cpu_runner
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.cpu_linear import CpuLinear, packing_available
from glm4serve.model.cpu_runner import CpuRunner, compiler_available
from glm4serve.model.glm4 import load_model
from glm4serve.model.runner import EagerRunner

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear packing")
needs_compiler = pytest.mark.skipif(not compiler_available(), reason="inductor needs a C++ compiler")
BLOCK = 4


def decode(runner, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the decode steps' logits [steps - 1, V] (the first step is the prompt's)."""
    pool = BlockPool(runner.num_blocks, BLOCK)
    table, start, nxt, got, rows = [], 0, prompt, [], []
    for _ in range(steps):
        table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
        logits = runner.execute(ScheduledBatch([SeqChunk(nxt, start, list(table))]))[0]
        start += len(nxt)
        rows.append(logits)
        nxt = [int(logits.argmax())]
        got.append(nxt[0])
    return got, torch.stack(rows[1:])


def runners(path, monkeypatch, **patches):
    """(CpuRunner, EagerRunner) over two loads of one checkpoint; patches: cpu_runner constants."""
    monkeypatch.setattr(cpu_runner, "COMPILED_DECODE_MIN_BYTES", 0)  # compile even these tiny models
    for name, value in patches.items():
        monkeypatch.setattr(cpu_runner, name, value)
    return (CpuRunner(load_model(path, dtype=torch.float32), 64, BLOCK),
            EagerRunner(load_model(path, dtype=torch.float32), 64, BLOCK))


def assert_close(got: torch.Tensor, want: torch.Tensor):
    assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1.0)


@needs_compiler
@pytest.mark.parametrize("variant,lm_head_in_graph", [("glm", False), ("glm4", False), ("glm", True),
                                                       ("glm4", True)])
def test_compiled_decode_matches_eager_and_transformers(make_checkpoint, monkeypatch, variant, lm_head_in_graph):
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(variant, "hf", "wide")
    if lm_head_in_graph:  # the output layer keeps a plain copy, which the last graph reads
        monkeypatch.setattr(cpu_runner, "STREAMED_WEIGHT_BYTES", 0)
    ours, eager = runners(path, monkeypatch)
    assert ours.one_token is not None and ours.one_token.head_in_graph == lm_head_in_graph
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    with torch.compiler.set_stance("fail_on_recompile"):  # warm_up compiled for every layer and context length
        got, compiled_logits = decode(ours, prompt, 16)
    want, eager_logits = decode(eager, prompt, 16)
    assert got == want
    assert_close(compiled_logits, eager_logits)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert got == expected


@needs_compiler
def test_compiled_decode_under_yarn_matches_eager(yarn_checkpoint, monkeypatch):
    """The graphs take YaRN's frequencies and scale from the model's rotary, as the eager layers do."""
    path, _ = yarn_checkpoint("5.x")
    ours, eager = runners(path, monkeypatch)
    assert ours.one_token is not None
    prompt = list(range(3, 90))  # past the trained context of 64
    got, compiled_logits = decode(ours, prompt, 12)
    want, eager_logits = decode(eager, prompt, 12)
    assert got == want
    assert_close(compiled_logits, eager_logits)


@needs_compiler
def test_attention_in_the_graphs_and_eager_attention_agree_across_the_switch(make_checkpoint, monkeypatch):
    """Contexts up to IN_GRAPH_ATTENTION_MAX_TOKENS attend inside the graphs, longer ones with eager
    SDPA between them: decodes that start in a single cache block and cross the limit match the
    eager runner, with no recompile along the way."""
    ours, eager = runners(make_checkpoint("glm", "hf", "wide"), monkeypatch, IN_GRAPH_ATTENTION_MAX_TOKENS=12)
    calls = {"attend_last": 0, "last": 0}
    for name in calls:
        graph = getattr(ours.one_token, name)

        def counted(*args, graph=graph, name=name):
            calls[name] += 1
            return graph(*args)

        setattr(ours.one_token, name, counted)
    for prompt in ([11, 23], [11, 23, 5, 99, 42, 7, 64, 3]):  # 3 and 9 tokens in the cache at the first decode
        with torch.compiler.set_stance("fail_on_recompile"):
            got, compiled_logits = decode(ours, prompt, 16)
        want, eager_logits = decode(eager, prompt, 16)
        assert got == want
        assert_close(compiled_logits, eager_logits)
    # 15 decode steps each (the first of 16 is the prompt's): contexts 3..12 and 9..12 attend in
    # the graphs, 13..17 and 13..23 eagerly
    assert calls == {"attend_last": 10 + 4, "last": 5 + 11}


def test_small_models_are_packed_not_compiled(make_checkpoint):
    runner = CpuRunner(load_model(make_checkpoint("glm", "hf", "wide"), dtype=torch.float32), 64, BLOCK)
    assert runner.one_token is None  # far below COMPILED_DECODE_MIN_BYTES
    linears = [m for m in runner.model.modules() if isinstance(m, CpuLinear)]
    assert len(linears) == 1 + 4 * runner.model.cfg.num_layers
    assert all(m.plain is None for m in linears)  # packed only: no second copy of any weight
    assert not any(isinstance(m, torch.nn.Linear) for m in runner.model.modules())


@needs_compiler
def test_compiled_layers_and_a_streamed_output_layer_hold_one_plain_copy(make_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_runner, "STREAMED_WEIGHT_BYTES", 0)
    ours, _ = runners(make_checkpoint("glm", "hf", "wide"), monkeypatch)
    linears = [m for m in ours.model.modules() if isinstance(m, CpuLinear)]
    assert ours.model.lm_head in linears and ours.one_token.head_in_graph
    assert all(m.plain is not None and m.weight is m.plain for m in linears)  # no second copy of any weight


def test_without_a_compiler_the_eager_layers_serve(make_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_runner, "compiler_available", lambda: False)
    ours, eager = runners(make_checkpoint("glm", "hf", "wide"), monkeypatch)
    assert ours.one_token is None and "no C++ compiler" in repr(ours)
    assert decode(ours, [1, 2, 3], 4)[0] == decode(eager, [1, 2, 3], 4)[0]


@needs_compiler
def test_a_compile_that_fails_at_load_fails_the_load(make_checkpoint, monkeypatch):
    """A path chosen at load either works or the load fails: no silent switch to a slower one."""
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor broke")

    path = make_checkpoint("glm", "hf", "wide")
    monkeypatch.setattr(cpu_runner, "COMPILED_DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_runner.torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match="inductor broke"):
        CpuRunner(load_model(path, dtype=torch.float32), 64, BLOCK)
    assert cpu_linear.torch.compile is broken_compile  # the same module object, patched for both


def test_bf16_linears_are_held_once_and_agree_with_eager_bf16(make_checkpoint):
    path = make_checkpoint("glm4", "hf", "wide")
    ours = CpuRunner(load_model(path, dtype=torch.bfloat16), 64, BLOCK)
    eager = EagerRunner(load_model(path, dtype=torch.bfloat16), 64, BLOCK)
    linears = [m for m in ours.model.modules() if isinstance(m, CpuLinear)]
    assert len(linears) == 1 + 4 * ours.model.cfg.num_layers and ours.one_token is None  # eager decode
    # one copy of every weight: plain for bf16_gemm.c's decode rows where it is built, else packed
    kernel = bf16_kernel.available() or bf16_kernel.avx2_available()
    assert all((m.kernel_rows > 0) == kernel and (m.weight is m.plain if kernel else m.plain is None)
               for m in linears)
    pool_ours, pool_eager = (BlockPool(64, BLOCK) for _ in "ab")
    tokens = [11, 23, 5, 99, 42, 7, 64, 3, 17, 250, 8, 1]
    got, want = [], []
    for runner, pool, rows in ((ours, pool_ours, got), (eager, pool_eager, want)):
        table = pool.allocate(pool.blocks_needed(len(tokens)))
        rows.append(runner.execute(ScheduledBatch([SeqChunk(tokens[:8], 0, table)]))[0])
        for i in range(8, len(tokens)):  # then one token at a time, as decode
            rows.append(runner.execute(ScheduledBatch([SeqChunk([tokens[i]], i, table)]))[0])
    got, want = torch.stack(got), torch.stack(want)
    # both in bf16: oneDNN's (or bf16_gemm.c's) and PyTorch's sums only run in other orders
    assert (got - want).abs().max().item() <= 2e-2 * max(want.abs().max().item(), 1.0)


@needs_compiler
def test_many_rows_take_the_compiled_norms_and_swiglu_and_agree_with_eager(make_checkpoint, monkeypatch):
    """A big model's RMSNorms and SwiGLUs run compiled on COMPILED_ROWS_MIN rows and more (prefill
    chunks), eagerly on fewer (decode): one compile, made at load, serves every layer, every kind of
    norm (glm4's sandwich ones too) and any number of rows."""
    monkeypatch.setattr(cpu_runner, "COMPILED_DECODE_MIN_BYTES", 0)  # as if big
    path = make_checkpoint("glm4", "hf", "wide")
    ours = CpuRunner(load_model(path, dtype=torch.bfloat16), 64, BLOCK)
    eager = EagerRunner(load_model(path, dtype=torch.bfloat16), 64, BLOCK)
    wrapped = [m for m in ours.model.modules() if isinstance(m, cpu_runner.ManyRowsCompiled)]
    assert len(wrapped) == 5 * ours.model.cfg.num_layers + 1 and "compiled norms" in repr(ours)
    compiled_rows = []
    spy = wrapped[0].compiled_call
    for m in wrapped:
        m.compiled_call = lambda module, x: (compiled_rows.append(x.shape[0]), spy(module, x))[1]
    tokens = [(7 * i + 3) % 250 for i in range(cpu_runner.COMPILED_ROWS_MIN + 37)]
    got, want = [], []
    with torch.compiler.set_stance("fail_on_recompile"):
        for runner, rows in ((ours, got), (eager, want)):
            pool = BlockPool(64, BLOCK)
            table = pool.allocate(pool.blocks_needed(len(tokens) + 4))
            rows.append(runner.execute(ScheduledBatch([SeqChunk(tokens, 0, table)]))[0])
            for i in range(4):  # decode rows, eager
                rows.append(runner.execute(ScheduledBatch([SeqChunk([tokens[i]], len(tokens) + i, table)]))[0])
    assert compiled_rows and set(compiled_rows) == {len(tokens)}  # the prompt's rows only
    got, want = torch.stack(got), torch.stack(want)
    assert (got - want).abs().max().item() <= 2e-2 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("backed_gib, level", [(3.9, "INFO"), (2.0, "WARNING")])
def test_the_runner_says_how_much_of_its_weights_lie_in_huge_pages(monkeypatch, caplog, backed_gib, level):
    monkeypatch.setattr(cpu_runner, "hugepage_backing", lambda: (int(backed_gib * 2**30), 4 << 30))
    with caplog.at_level("INFO", logger=cpu_runner.__name__):
        cpu_runner.log_hugepage_backing()
    [record] = caplog.records
    assert record.levelname == level and f"{backed_gib:.2f} of 4.00 GiB" in record.getMessage()
    assert ("compact_memory" in record.getMessage()) == (level == "WARNING")


def test_a_small_model_says_nothing_of_huge_pages(monkeypatch, caplog):
    monkeypatch.setattr(cpu_runner, "hugepage_backing", lambda: (0, 8 << 20))
    with caplog.at_level("INFO", logger=cpu_runner.__name__):
        cpu_runner.log_hugepage_backing()
    assert not caplog.records
