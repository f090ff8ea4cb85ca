"""one_row.py's folded decode layer (the batch-1 step's small ops done by gemv.py's kernel around its
products): which models it runs, its pieces against the model's own (segments.py) with the K/V stored
in place, and the CUDA runner keeping whichever batch-1 step replays faster. The runner's steps through
it against the eager runner's are test_paged_decode's (`folded`)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from glm4serve.model import compiled_layers, cuda_runner, segments
from glm4serve.model.cuda_runner import CudaGraphRunner
from glm4serve.model.gemv import Blocks
from glm4serve.model.glm4 import load_model
from glm4serve.model.kv_cache import KVCache
from glm4serve.model.one_row import Folded, can_fold, swap_row_product_linears
from glm4serve.model.paged_decode import merge_splits

ALL_FOUR = {"qkv": Blocks(8, 32, 4), "o": Blocks(2, 64, 4), "gate_up": Blocks(4, 128, 4), "down": Blocks(16, 64, 4),
            "lm_head": Blocks(32, 512, 8)}


def test_it_runs_the_glm_variant_with_every_product_on_the_kernel(make_checkpoint, tmp_path):
    """Not the glm4 variant (its extra norms), not with a product left to cuBLAS or inductor's reduction
    or in blocks of one row, not with LoRA adapters on the linears (their own wrappers); the output
    layer may stay cuBLAS's."""
    from glm4serve.model.lora import load_loras
    from glm4serve.model.random_checkpoint import write_random_adapter

    path = make_checkpoint("glm", shape="small")
    def without(name):
        return {k: v for k, v in ALL_FOUR.items() if k != name}

    for kernels, folds in [(ALL_FOUR, True), ({**ALL_FOUR, "lm_head": None}, True), (without("lm_head"), True),
                           ({**ALL_FOUR, "o": None}, False), (without("down"), False),
                           ({**ALL_FOUR, "gate_up": Blocks(1, 128, 4)}, False)]:  # one row: SwiGLU's pairs split
        model = load_model(path, dtype="float32")
        swap_row_product_linears(model, kernels)
        assert can_fold(model) == folds, kernels
    glm4 = load_model(make_checkpoint("glm4", shape="small"), dtype="float32")
    swap_row_product_linears(glm4, ALL_FOUR)
    assert not can_fold(glm4)
    model = load_model(path, dtype="float32")
    adapter = str(write_random_adapter(tmp_path / "a", path, rank=2, targets=("attn.qkv",), seed=1))
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR,
                             loras=load_loras({"a": adapter}, model, runtime=False))
    assert not runner.folded and not can_fold(model)


@pytest.mark.parametrize("piece", ["first", "merge_between", "merge_last"])
def test_folded_pieces_are_the_models_own_and_store_k_v_in_place(make_checkpoint, device, kernel_runs, piece):
    """Each compiled folded piece against segments.py's (the model's own methods), with K and V written
    into the layer's cache where the slot says (by the qkv kernel), nothing else, and no buffer the
    cache's size (a copy); compiled as the runner compiles them, with PDL."""
    from torch._inductor.utils import run_and_get_code

    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device=device)
    swap_row_product_linears(model, ALL_FOUR)
    cfg, layers = model.cfg, model.layers
    kv = KVCache(cfg, 53, 4, torch.float32, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.hidden_size, generator=g).to(device)
    ids, positions = torch.tensor([11], device=device), torch.tensor([9], device=device)
    cos, sin = model.rotary(positions)
    slots = torch.tensor([197], device=device)
    partials = (torch.randn(1, cfg.num_kv_heads, 4, 16, cfg.head_dim, generator=g).to(device),
                torch.randn(1, cfg.num_kv_heads, 4, 16, generator=g).to(device),
                torch.rand(1, cfg.num_kv_heads, 4, 16, generator=g).to(device) + 0.5)
    attn = merge_splits(*partials, cfg.num_heads).flatten(1)  # [1, Hq * D]
    stores = piece != "merge_last"
    with torch.inference_mode():  # the swapped linears outside a compile: F.linear, the model's own products
        embedded = model.embed(ids)  # [1, H]
        args, want = {
            "first": ((model, ids, positions), (embedded, cos, sin, *segments.first(layers[0], embedded, cos, sin))),
            "merge_between": ((layers[0], layers[1], x, partials, cos, sin),
                              segments.between(layers[0], layers[1], x, attn, cos, sin)),
            "merge_last": ((layers[-1], model, x, partials), (segments.last_with_head(layers[-1], model, x, attn),)),
        }[piece]
    fn = getattr(Folded(lambda f, pdl: f), piece)

    def this_tests_own(*args):  # a code object no runner compiled: its code is made here
        return fn(*args)

    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        got, codes = run_and_get_code(compiled_layers.compile_piece(this_tests_own, pdl=True), *args,
                                      *((kv.k_slots[1], kv.v_slots[1], slots) if stores else ()))
    got = got if isinstance(got, tuple) else (got,)
    expected = want[:-2] if stores else want  # (x, cos, sin, q), (x, q), (logits,)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours.reshape(theirs.shape), theirs, rtol=1e-4, atol=1e-4)
    assert "torch.ops.glm4serve.row_product" in codes[0]  # the kernel's, not inductor's products
    if piece != "first" and device == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        assert "gdc_wait" in codes[0]  # the merge's kernel of inductor's launched with PDL, as the runner's
    if stores:
        torch.testing.assert_close(kv.k_slots[1][slots], want[-2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv.v_slots[1][slots], want[-1], rtol=1e-4, atol=1e-4)
        kv.k_slots[1][slots] = 0
        assert kv.k_slots[1].abs().sum() == 0  # nothing else written
        sizes = [math.prod(int(n) for n in shape.split(",") if n.strip())
                 for code in codes for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", code)]
        assert max(sizes, default=0) < kv.k[1].numel(), codes[0][-3000:]  # no buffer the cache's size


class Graph:
    """Stands in for a captured CUDA graph: its replay's time is the test's to say."""

    def __init__(self, name: str):
        self.name = name

    def replay(self):
        pass


@pytest.mark.parametrize("folded_ms,unfolded_ms,keeps", [(5.0, 6.0, "folded"), (6.0, 5.0, "unfolded"),
                                                        (5.0, None, "folded")])
def test_the_runner_keeps_the_batch_1_step_that_replays_faster(make_checkpoint, monkeypatch, folded_ms,
                                                                 unfolded_ms, keeps):
    """Captured folded, the batch-1 step is captured again without folding and the faster replay kept
    (runner.step_ms says both); folded where the other fails."""
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR)
    assert runner.folded
    captured_folded = []

    def capture_size(size, pool, warm_up=None):
        assert size == 1 and pool == "pool" and warm_up == runner._step  # a failure raises, no fall-back
        captured_folded.append(runner.folded)
        if unfolded_ms is None:
            raise RuntimeError("no capture")
        return Graph("unfolded"), "unfolded logits"

    monkeypatch.setattr(runner, "_capture_size", capture_size)
    times = {"folded": folded_ms, "unfolded": unfolded_ms}
    monkeypatch.setattr(cuda_runner, "replay_ms", lambda graph: times[graph.name])
    graph, logits = runner._folded_or_not(Graph("folded"), "folded logits", "pool")
    assert captured_folded == [False]  # the second capture is the unfolded step's
    assert graph.name == keeps and logits == f"{keeps} logits" and runner.folded == (keeps == "folded")
    assert runner.step_ms == ({"folded": folded_ms, "unfolded": unfolded_ms} if unfolded_ms else {})
    assert ("small ops folded in" in repr(runner)) == (keeps == "folded")


def test_folded_the_batch_1_step_may_take_the_kernel_where_cublas_was_faster_alone(make_checkpoint, monkeypatch):
    """With `fold_with` (the kernel's best blocks for each of a layer's products), the folded step runs
    all four on the kernel even where `one_row` left one to cuBLAS (o here); the unfolded step is
    captured on `one_row`'s, and the model's linears are left as the kept step has them."""
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    one_row = {k: v for k, v in ALL_FOUR.items() if k != "o"}
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=one_row,
                             fold_with={**ALL_FOUR, "lm_head": Blocks(4, 512, 2)})
    assert runner.folded and type(model.layers[0].attn.o).__name__ == "RowProductLinear"
    assert runner.one_row_kernels()["lm_head"] == "Triton 32x512/8w"  # the output layer: one_row's choice
    seen = []

    def capture_size(size, pool, warm_up=None):
        seen.append(type(model.layers[0].attn.o) is torch.nn.Linear)  # cuBLAS's, as one_row has it
        return Graph("unfolded"), "unfolded logits"

    monkeypatch.setattr(runner, "_capture_size", capture_size)
    for folded_ms, keeps in ((5.0, "folded"), (7.0, "unfolded")):
        times = {"folded": folded_ms, "unfolded": 6.0}
        monkeypatch.setattr(cuda_runner, "replay_ms", lambda graph: times[graph.name])
        graph, _ = runner._folded_or_not(Graph("folded"), "folded logits", "pool")
        assert graph.name == keeps and runner.folded == (keeps == "folded")
        assert ("o" in runner.one_row_kernels()) == (keeps == "folded")
    assert seen == [True, True]


def test_a_failure_gives_up_pdl_then_folding_then_the_kernels_then_the_compile(make_checkpoint, monkeypatch):
    """On a GPU whose kernels launch with PDL; a failure at a step of more rows (which runs no one-row
    kernel) gives up the compiled layers at once."""
    from glm4serve.model import gemv

    monkeypatch.setattr(gemv, "launches_pdl", lambda device: True)
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False,
                             one_row={"down": Blocks()}, fold_with=ALL_FOUR)
    assert runner.folded and runner.pdl and runner.fused.folded_pieces.pdl
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.folded and not runner.pdl and not model.layers[0].mlp.down.pdl
    assert not runner.fused.folded_pieces.pdl  # their own kernels too, compiled again
    runner._fall_back("capturing", RuntimeError("no"))
    assert not runner.folded and runner.one_row_kernels() == {"down": "Triton 8x512/4w"}
    assert not model.layers[0].mlp.down.pdl  # a linear wrapped again keeps PDL off
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.one_row_kernels() == {} and runner.fused is not None and not can_fold(model)
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.fused is None
    with pytest.raises(RuntimeError, match="again"):
        runner._fall_back("capturing", RuntimeError("again"))

    runner = CudaGraphRunner(load_model(make_checkpoint("glm", shape="small"), dtype="float32"), 8, 4, None,
                             max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR)
    runner._fall_back("compiling the decode step of 2 rows", RuntimeError("no"), one_row=False)
    assert runner.fused is None and not runner.folded and runner.pdl


def test_the_batch_1_step_is_checked_against_the_model_as_written(make_checkpoint, monkeypatch, kernel_runs):
    """check_batch1: the folded step (here _step(1): the kernel in Triton's interpreter, the pieces compiled
    for the CPU) has the model's own logits; one whose kernel leaves out the residual, or does not store
    the token's K/V (it would read what the slot held), has not; a model whose own logits are not finite
    is not held to them. After it the runner's linears and the buffers' padding are as before."""
    from glm4serve.model import gemv
    from glm4serve.model.one_row import RowProductLinear

    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR)
    padding = runner.buffers.meta[:, :1].clone()
    check = runner.check_batch1(lambda: runner._step(1))
    assert check["ok"] and check["cosine"] > 0.9999 and check["max_rel_diff"] < 1e-3, check
    assert runner.folded and isinstance(model.layers[0].attn.o, RowProductLinear)
    assert torch.equal(runner.buffers.meta[:, :1], padding)
    real = gemv._launch

    def without_residual(*args):  # (x, weight, bias, rows, cols, warps, norm, eps, swiglu, cos, sin, rotated,
        y = real(*args)  # residual, pdl[, kv])
        return y if args[12] is None else y - args[12]

    for broken in (without_residual, lambda *args: real(*args[:14])):  # the second: no K/V stored
        monkeypatch.setattr(gemv, "_launch", broken)
        check = runner.check_batch1(lambda: runner._step(1))
        assert not check["ok"], check
    monkeypatch.setattr(gemv, "_launch", real)
    with torch.no_grad():  # a model whose own logits are nan: nothing to hold the step to, kept as it is
        model.layers[-1].mlp.down.weight.fill_(float("nan"))
    check = runner.check_batch1(lambda: runner._step(1))
    assert check["ok"] and check["reference_finite"] is False


def test_another_runner_on_the_same_model_gets_its_own_linears_meanwhile(make_checkpoint):
    """A runner made on a model whose linears another runner wrapped would take those wrappers for its own
    (folded on the other's kernels); within the other's linears_as_written it wraps the model's own as it
    is told, and after it the other has its wrappers back."""
    from glm4serve.model.one_row import RowProductLinear

    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    first = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR)
    unaware = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False)
    assert unaware.folded and unaware.one_row_kernels() == {}  # the first's kernels, run as its own
    with first.linears_as_written():
        second = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False,
                                 one_row={"down": Blocks(2, 64, 4)})
        assert not second.folded and second.one_row_kernels() == {"down": "Triton 2x64/4w"}
        assert type(model.layers[0].attn.o) is torch.nn.Linear
        second.close()
    assert first.folded and isinstance(model.layers[0].attn.o, RowProductLinear)
    assert first.one_row_kernels() == {n: f"Triton {b}" for n, b in ALL_FOUR.items()}


def test_a_wrong_batch_1_step_gives_up_pdl_then_folding_then_the_kernels_then_the_compile(make_checkpoint,
                                                                                        monkeypatch):
    """A batch-1 graph whose logits are not the model's is captured again after each stage given up
    (_fall_back) until they are; wrong with none of its own left, the compiled layers go for every size
    (_capture captures the ladder again)."""
    from glm4serve.model import gemv

    monkeypatch.setattr(gemv, "launches_pdl", lambda device: True)
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False, one_row=ALL_FOUR)
    seen = []

    def check_wrong_while(wrong):
        def check(step):
            step()
            seen.append((runner.pdl, runner.folded, bool(runner.swapped), runner.fused is not None))
            ok = not wrong()
            return {"cosine": 1.0 if ok else 0.1, "max_rel_diff": 0.0, "ok": ok}
        return check

    monkeypatch.setattr(runner, "_capture_size", lambda size, pool, warm_up=None: (Graph("again"), "logits"))
    monkeypatch.setattr(runner, "check_batch1", check_wrong_while(lambda: runner.swapped))
    graph, logits = runner._checked_batch1(Graph("first"), "first logits", "pool")
    assert seen == [(True, True, True, True), (False, True, True, True), (False, False, True, True),
                    (False, False, False, True)]
    assert graph.name == "again" and runner.batch1_check["ok"] and runner.fused is not None

    seen.clear()
    monkeypatch.setattr(runner, "check_batch1", check_wrong_while(lambda: True))
    with pytest.raises(cuda_runner.WrongLogits, match="cosine 0.1000"):
        runner._checked_batch1(Graph("first"), "first logits", "pool")
    assert seen == [(False, False, False, True)]

    ladders = []

    def capture_ladder():
        ladders.append(runner.fused is not None)
        if len(ladders) == 1:
            raise cuda_runner.WrongLogits("wrong")

    monkeypatch.setattr(runner, "_capture_ladder", capture_ladder)
    runner._capture()
    assert ladders == [True, False] and runner.fused is None


@pytest.mark.cuda
def test_a_folded_graph_with_a_broken_kernel_is_not_kept(make_checkpoint, device, monkeypatch, tolerances, caplog):
    """On the GPU, captured: a kernel that leaves out the residual (as a read before its write would) makes
    the folded batch-1 graph's logits wrong (kept folded by its replay's time here); the runner gives it
    up and keeps a graph whose logits are the eager runner's."""
    from glm4serve.model import gemv
    from glm4serve.model.runner import EagerRunner

    real = gemv._launch

    def without_residual(*args):
        y = real(*args)
        return y if args[12] is None else y - args[12]

    monkeypatch.setattr(gemv, "_launch", without_residual)
    monkeypatch.setattr(CudaGraphRunner, "_folded_or_not", lambda self, graph, logits, pool: (graph, logits))
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device=device)
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=1, max_model_len=32, one_row=ALL_FOUR)
    assert runner.batch1_check["ok"] and not runner.folded and runner.fused is not None, runner.batch1_check
    assert runner.one_row_kernels() == {n: f"Triton {b}" for n, b in ALL_FOUR.items()}  # unfolded, on the kernel
    assert "checking the batch-1 step against the model as written failed with the batch-1 step folded" in caplog.text
    eager = EagerRunner(model, 8, 4)
    from glm4serve.model.batch import ScheduledBatch, SeqChunk

    for r in (eager, runner):
        r.execute(ScheduledBatch([SeqChunk([3, 5, 7], 0, [0])]))
    step = ScheduledBatch([SeqChunk([9], 3, [0])])
    tolerances["float32"].assert_close(runner.execute(step), eager.execute(step))


def test_the_folded_products_blocks_are_timed_again_with_their_options(make_checkpoint, monkeypatch, kernel_runs):
    """At load (fastest_one_row_kernels): for each of a layer's four products, the three fastest blocks
    that agreed with cuBLAS are timed again launched as the folded layer launches them (its norm, bias,
    rotary and K/V store; SwiGLU; the residual), and the fastest of those is the folded step's; the
    output layer, and the choice over cuBLAS, stay the plain kernel's. The GPU's timing stands in here:
    each timed product is run once (the kernel in Triton's interpreter) and given a time by its blocks."""
    from glm4serve.model import gemv, one_row

    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32")
    a, b, c, d, wrong = Blocks(4, 512, 2), Blocks(2, 1024, 4), Blocks(8, 256, 2), Blocks(4, 512, 4), Blocks()
    plain = {a: 10.0, b: 11.0, c: 12.0, d: 13.0, wrong: 5.0}  # `wrong` disagreed with cuBLAS: never timed again

    def fastest(weights):
        report = {"cublas": {"us": 20.0}, **{str(k): {"us": us, "error": 0.5 if k == wrong else 0.001}
                                             for k, us in plain.items()}}
        return a, a, report

    launched = []
    real_linear = gemv.linear

    def linear(x, w, bias, blocks, **options):
        launched.append((w.shape[0], blocks, options))
        return real_linear(x, w, bias, blocks, **options)

    def replay_us(product, weights, x):
        product(weights[0], x)  # the kernel with the options, once
        rows, blocks, _ = launched[-1]
        return 1.0 if rows == 2 * model.cfg.intermediate_size and blocks == b else plain[blocks]  # gate_up: b

    monkeypatch.setattr(gemv, "fastest", fastest)
    monkeypatch.setattr(gemv, "linear", linear)
    monkeypatch.setattr(gemv, "replay_us", replay_us)
    chosen, best = one_row.fastest_one_row_kernels(model)
    assert chosen == dict.fromkeys(one_row.ONE_ROW_PRODUCTS, a)
    assert best == {"qkv": a, "o": a, "gate_up": b, "down": a, "lm_head": a}
    timed = [(rows, blocks, sorted(options)) for rows, blocks, options in launched]
    cfg = model.cfg
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert timed == [(rows, blocks, keys) for rows, keys in (
        (qkv_rows, ["norm", "rotary", "store_kv"]), (cfg.hidden_size, ["residual"]),
        (2 * cfg.intermediate_size, ["norm", "swiglu"]), (cfg.hidden_size, ["residual"]))
        for blocks in (a, b, c)]


@pytest.mark.cuda
def test_the_folded_products_timing_runs_on_this_gpu(make_checkpoint, device):
    """On the GPU: each of a layer's four products timed with the folded layer's options, in two blocks."""
    from glm4serve.model import gemv, one_row

    model = load_model(make_checkpoint("glm", shape="small"), dtype="bfloat16", device=device)
    candidates = [Blocks(4, 512, 2), Blocks(2, 1024, 4)]
    for name in one_row.FOLDED_PRODUCTS:
        linears = [linear for _, _, linear in one_row.named_linears(model, (name,))]
        fastest, report = gemv.fastest_with([m.weight for m in linears], candidates, linears[0].bias,
                                            one_row.timing_options(model, name))
        assert fastest in candidates and all(report[str(b)]["us"] > 0 for b in candidates), (name, report)
