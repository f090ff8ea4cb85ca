"""The GPU decode path, checked on the test device (`--device`): the Triton paged decode kernel
against the PyTorch decode attention, and the CUDA graph runner (static buffers, padded batch sizes,
the sink block) against the eager runner on the same model. On CPU the kernel runs in Triton's
interpreter and the runner's steps run its static buffers eagerly; with --device cuda both run for
real and the runner replays captured graphs."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from glm4serve.model.attention import AttentionBatch, decode_attention, decode_attention_one, write_kv
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.cuda_runner import CudaGraphRunner, graph_batch_sizes
from glm4serve.model.one_row import RowProductLinear, swap_row_product_linears
from glm4serve.model.gemv import Blocks
from glm4serve.model.glm4 import load_model
from glm4serve.model.paged_decode import num_splits, paged_decode_attention
from glm4serve.model.runner import EagerRunner
from tests.gpu_compile import compiled_in_a_fresh_process, each_compiled
from tests.paged_caches import scattered_cache


# (query heads, KV heads, head dim, block size, context lengths): glm-4-9b's 32 over 2 heads of 128;
# a group of 2 (padded to 16 in the kernel); blocks of 8 and 4 (a 64-key tile spans several blocks);
# lengths of 1, at and across block and tile edges, and long enough to be split.
CASES = [
    (32, 2, 128, 16, [1, 16, 17, 300]),
    (4, 2, 16, 16, [64, 65, 1000]),
    (6, 3, 32, 8, [9, 128, 129]),
    (4, 2, 16, 4, [3, 200]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}over{c[1]}x{c[2]}-bs{c[3]}")
@pytest.mark.parametrize("kernel_dtype", ["float32", "bfloat16"])
def test_kernel_equals_the_pytorch_decode_attention(case, kernel_dtype, device, kernel_runs):
    hq, hkv, d, block_size, lens = case
    dtype = getattr(torch, kernel_dtype)
    q, k, v, tables, ctx = scattered_cache(hq, hkv, d, block_size, lens, dtype, device)
    truth = decode_attention(q.float(), k.float(), v.float(), tables, ctx, d**-0.5)
    ours = paged_decode_attention(q, k, v, tables, ctx, d**-0.5)
    assert ours.dtype == dtype and ours.shape == q.shape
    # bf16: the probabilities are rounded to bf16 before the weighted sum, as tensor cores take them
    bound = 1e-5 if dtype == torch.float32 else 3e-2
    assert (ours.float() - truth).abs().max().item() < bound


def test_kernel_reads_nothing_past_the_context(device, kernel_runs):
    """Keys past a sequence's length (the rest of its last block, and blocks the table does not list)
    are never read: filling them with nan changes nothing."""
    q, k, v, tables, ctx = scattered_cache(32, 2, 128, 16, [20, 70], torch.float32, device)
    before = paged_decode_attention(q, k, v, tables, ctx, 0.1)
    used = {(int(tables[i, p // 16]), p % 16) for i, n in enumerate(ctx.tolist()) for p in range(n)}
    for blk in range(k.shape[0]):
        for slot in range(16):
            if (blk, slot) not in used:
                k[blk, slot], v[blk, slot] = float("nan"), float("nan")
    after = paged_decode_attention(q, k, v, tables, ctx, 0.1)
    assert torch.equal(before, after)


# (compute capability, dtype, query heads per KV head): H100/H200 in each dtype the runner uses,
# glm-4-9b-chat-1m's groups of 8, and an A100
TARGETS = [(90, "bf16", 16), (90, "fp16", 16), (90, "fp32", 16), (90, "bf16", 8), (80, "bf16", 16)]
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # the most one program may take on that SM


def compile_for_gpus(targets) -> dict:
    """Compile the kernel for each (capability, dtype, groups) with Triton's own compiler (ptxas
    included; no GPU needed) -> {str(target): [shared memory bytes, griddepcontrol waits], or the
    error}; with PDL where the runner launches it so (sm_90: gemv.launches_pdl). Run in a process
    without TRITON_INTERPRET: under it, Triton's own library functions are interpreted ones."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glm4serve.model import paged_decode

    kernel = paged_decode._kernel()

    def one(capability, dtype, groups):
        pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "tables_ptr": "i64", "lens_ptr": "i64",
                    "acc_ptr": "fp32", "max_ptr": "fp32", "sum_ptr": "fp32"}
        constants = dict(G=groups, GP=16, D=128, BLOCK=16, SPLITS=paged_decode.MAX_SPLITS,
                         TILE=paged_decode.TILE, DOT_F32=dtype == "fp32", PDL=capability >= 90)
        signature = {name: "constexpr" if name in constants else "*" + pointers[name] if name in pointers
                     else "fp32" if name == "scale" else "i64" for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                  target=GPUTarget("cuda", capability, 32), options={"launch_pdl": capability >= 90})
        if not compiled.asm["cubin"]:
            return "no cubin"
        return compiled.metadata.shared, compiled.asm["ptx"].count("griddepcontrol.wait")

    return each_compiled(targets, one)


@pytest.fixture(scope="module")
def compiled_for_gpus(device):
    if device == "cuda":
        pytest.skip("with --device cuda the tests here run the kernel compiled for this GPU")
    return compiled_in_a_fresh_process("tests.test_paged_decode", TARGETS)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t[0]}-{t[1]}-G{t[2]}")
def test_kernel_compiles_for_the_gpus_it_runs_on(target, compiled_for_gpus):
    """The interpreter runs the kernel's Python; compiling it catches what only a GPU would otherwise
    show: types a dot refuses, a layout the backend rejects, more shared memory than the SM has. On
    sm_90 the batch-1 step launches it with PDL: its one wait, before it reads anything."""
    result = compiled_for_gpus[str(target)]
    assert isinstance(result, list), result
    shared, waits = result
    assert 0 < shared <= SHARED_MEMORY[target[0]]
    assert waits == (1 if target[0] >= 90 else 0), result


def test_the_kernel_is_refused_where_triton_could_not_build_it(monkeypatch):
    """Triton builds launchers with a C compiler (CC, else gcc or clang): without one the runner is told
    why not to use the kernel, rather than every decode failing."""
    from glm4serve.model import paged_decode

    assert paged_decode.unsupported(128) is None  # here: Triton and a compiler
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(paged_decode.shutil, "which", lambda name: None)
    assert "C compiler" in paged_decode.unsupported(128)
    monkeypatch.setenv("CC", "cc")
    assert paged_decode.unsupported(128) is None
    assert "power of two" in paged_decode.unsupported(96)


def test_decode_attention_in_pytorch_is_not_poisoned_by_what_a_block_held_before(device):
    """Decode attention in PyTorch (CPU, and a GPU without the kernel) reads whole blocks behind a mask
    (the rest of a sequence's last block, and block 0 where a shorter sequence's table is padded).
    Blocks that held nan and inf K/V (a sequence's fp16 overflow) and then passed to others: their
    outputs are those over clean blocks. With the kernel, which reads no slot past a context, the
    K/V are stored as they are."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 8
    caches = [torch.zeros(4, bs, hkv, d, device=device) for _ in range(4)]  # poisoned k, v; clean k, v
    bad = torch.full((2 * bs, hkv, d), float("nan"), device=device)
    bad[bs:] = float("inf")
    bad_slots = torch.cat([torch.arange(0, bs), torch.arange(2 * bs, 3 * bs)]).to(device)
    write_kv(caches[0], caches[1], bad, -bad, AttentionBatch(slot_mapping=bad_slots))
    lens = [12, 3]  # sequence 0 in blocks 1 and 3, sequence 1 in block 2 (its table padded with block 0)
    slots = torch.cat([torch.arange(bs, 2 * bs), torch.arange(3 * bs, 3 * bs + 4), torch.arange(2 * bs, 2 * bs + 3)])
    k, v = (torch.randn(len(slots), hkv, d, generator=g).to(device) for _ in "kv")
    for kc, vc in (caches[:2], caches[2:]):
        write_kv(kc, vc, k, v, AttentionBatch(slot_mapping=slots.to(device)))
    q = torch.randn(2, hq, d, generator=g).to(device)
    tables = torch.tensor([[1, 3], [2, 0]], device=device)
    context_lens = torch.tensor(lens, device=device)
    poisoned = decode_attention(q, caches[0], caches[1], tables, context_lens, 0.25)
    assert torch.equal(poisoned, decode_attention(q, caches[2], caches[3], tables, context_lens, 0.25))
    table, length = torch.tensor([2, 0], device=device), torch.tensor([3], device=device)
    one = decode_attention_one(q[1:], caches[0], caches[1], table, length, 0.25)
    assert torch.isfinite(one).all()
    torch.testing.assert_close(one, poisoned[1:].flatten(1))
    kept = torch.zeros(4, bs, hkv, d, device=device)
    write_kv(kept, kept.clone(), bad, -bad, AttentionBatch(slot_mapping=bad_slots, paged_decode=True))
    assert kept.isnan().sum() == bs * hkv * d and kept.isinf().sum() == bs * hkv * d


def test_small_batches_get_more_splits():
    cpu = torch.device("cpu")
    assert num_splits(1, 2, cpu) > num_splits(4, 2, cpu) >= num_splits(64, 2, cpu) == 1


def test_graph_batch_sizes_end_at_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]


def test_one_row_products_name_the_linears_they_swap(make_checkpoint):
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="gate"):
        swap_row_product_linears(model, {"qkv": None, "gate": None})
    assert not any(isinstance(m, RowProductLinear) for m in model.modules())  # nothing swapped on the way
    swapped = swap_row_product_linears(model, {"o": None, "down": Blocks(16, 256, 4)})
    assert [name for _, name, _ in swapped] == ["o", "down"] * model.cfg.num_layers
    assert all(layer.attn.o.kernel() == "reduction" and layer.mlp.down.kernel() == "Triton 16x256/4w"
               and type(layer.mlp.gate_up) is torch.nn.Linear for layer in model.layers)


def test_a_failed_compile_or_capture_drops_the_one_row_kernels_first(make_checkpoint):
    """A failure with the one-row kernels in the graph: cuBLAS's products back in place, the layers
    still compiled; a second: the layers as written; a third is raised."""
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device="cpu")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False,
                             one_row={"down": Blocks()})
    assert runner.one_row_kernels() == {"down": "Triton 8x512/4w"}
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.fused is not None and runner.one_row_kernels() == {}
    assert all(type(layer.mlp.down) is torch.nn.Linear for layer in model.layers)
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.fused is None
    with pytest.raises(RuntimeError, match="again"):
        runner._fall_back("capturing", RuntimeError("again"))


def test_a_failure_with_pdl_launches_the_one_row_kernels_without_it_first(make_checkpoint, monkeypatch):
    """On a GPU whose kernels launch with programmatic dependent launch (sm_90+): a failure turns it off
    for every one-row kernel, which stay; the next drops them (cuBLAS's products)."""
    from glm4serve.model import gemv

    monkeypatch.setattr(gemv, "launches_pdl", lambda device: True)
    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device="cpu")
    runner = CudaGraphRunner(model, 8, 4, None, max_num_seqs=2, max_model_len=32, capture=False,
                             one_row={"down": Blocks(), "o": None})
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.one_row_kernels() == {"o": "reduction", "down": "Triton 8x512/4w"}
    assert all(not layer.mlp.down.pdl for layer in model.layers)
    runner._fall_back("capturing", RuntimeError("no"))
    assert runner.fused is not None and runner.one_row_kernels() == {}


def step(runner, chunks, copies=()):
    return runner.execute(ScheduledBatch(chunks, list(copies))).float().cpu()


@pytest.mark.parametrize("fuse,variant,one_row", [
    (False, "glm", None), (True, "glm", None), (True, "glm4", None),
    (True, "glm", dict.fromkeys(("qkv", "down", "lm_head"))),
    (True, "glm", {"qkv": Blocks(8, 32, 4), "down": Blocks(16, 64, 4), "lm_head": Blocks(32, 512, 8)}),
    (True, "glm", {"qkv": Blocks(8, 32, 4), "o": Blocks(2, 64, 4), "gate_up": Blocks(4, 128, 4),
                   "down": Blocks(16, 64, 4), "lm_head": Blocks(32, 512, 8)}),
    (True, "glm", {"qkv": Blocks(8, 32, 4), "o": Blocks(2, 64, 4), "gate_up": Blocks(4, 128, 4),
                   "down": Blocks(16, 64, 4)}),
], ids=["as-written", "fused", "fused-glm4", "fused-one-row", "fused-one-row-triton", "folded", "folded-cublas-head"])
def test_graph_runner_equals_the_eager_runner(make_checkpoint, device, tolerances, kernel_runs, fuse, variant,
                                              one_row):
    """Prefill three sequences, then decode them in batches of 3, 1 and 5 (padded to 4, 1 and 8), with
    a copy-on-write block copy on the way: the same logits as the eager runner's every step, and
    the same K/V in every block the engine owns (the padding rows wrote only the sink block). Fused:
    the layers compiled by inductor (for the CPU here; batch 4 static, 1, then 8 with dynamic rows),
    glm4's extra norms too. Folded: every layer's products on gemv.py's kernel, the batch-1 steps
    through one_row.py's pieces (the small ops in that kernel), the output layer's too or cuBLAS's."""
    if device == "cuda" and one_row and "o" in one_row and "lm_head" not in one_row:
        pytest.skip("folded with cuBLAS's output layer: the CPU run's; on a GPU `folded` covers the pieces, and "
                    "a lent GPU's minutes are few")
    path = make_checkpoint(variant, shape="small")
    model = load_model(path, dtype="float32", device=device)
    block_size, num_blocks = 4, 40
    capture = device == "cuda"
    graphs = CudaGraphRunner(model, num_blocks, block_size, None, max_num_seqs=8, max_model_len=64, capture=capture,
                             fuse=fuse, one_row=one_row)
    # the named linears of every layer, and the output layer
    per_layer = len(set(one_row or ()) - {"lm_head"})
    assert len(graphs.swapped) == per_layer * model.cfg.num_layers + ("lm_head" in (one_row or ()))
    assert graphs.folded == (one_row is not None and len(one_row) >= 4)
    eager = EagerRunner(model, num_blocks, block_size)
    assert graphs.num_blocks == num_blocks and graphs.kv.num_blocks == num_blocks + 1
    assert bool(graphs.graphs) == capture
    if capture:  # the kept batch-1 graph was checked against the model as written at load
        assert graphs.batch1_check["ok"] and graphs.batch1_check["cosine"] > 0.999, graphs.batch1_check
    g = torch.Generator().manual_seed(1)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(5)]  # 8 blocks (32 tokens) each
    lens = [7, 4, 11, 1, 5]
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in lens]
    first = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    for runner in (graphs, eager):
        step(runner, first[:3])  # three prefills; 3 and 4 start later, at once as decodes of one token
        step(runner, first[3:])

    def decode(rows, t):
        return [SeqChunk([(7 * i + t) % 500], lens[i] + t, tables[i]) for i in rows]

    schedule = [[0, 1, 2]] * 3 + [[1]] * 2 + [[0, 1, 2, 3, 4]] * 4
    for t, rows in enumerate(schedule):
        copies = [(tables[1][0], 39)] if t == 4 else []
        ours, theirs = step(graphs, decode(rows, t), copies), step(eager, decode(rows, t), copies)
        assert ours.shape[0] == len(rows)
        tolerances["float32"].assert_close(ours, theirs)
    for layer in range(model.cfg.num_layers):
        assert torch.allclose(graphs.kv.k[layer][:num_blocks], eager.kv.k[layer], atol=1e-5)
        assert torch.allclose(graphs.kv.v[layer][:num_blocks], eager.kv.v[layer], atol=1e-5)
    assert (graphs.fused is not None) == fuse, "the compile failed and the runner fell back to the layers as written"
    graphs.close()
    assert not any(isinstance(m, RowProductLinear) for m in model.modules())  # the model's own linears, back


@pytest.mark.parametrize("fuse", [False, True], ids=["as-written", "fused"])
def test_graph_runner_runs_prefill_and_mixed_steps_eagerly(make_checkpoint, device, kernel_runs, fuse):
    """A step with prompt tokens, or more sequences than the largest graph, is not a graph's: it runs
    eagerly (fused: through the compiled pieces) and still gives one row per chunk."""
    path = make_checkpoint(shape="small")
    model = load_model(path, dtype="float32", device=device)
    graphs = CudaGraphRunner(model, 20, 4, None, max_num_seqs=2, max_model_len=32, capture=device == "cuda",
                             fuse=fuse)
    eager = EagerRunner(model, 20, 4)
    if fuse:  # as the capture does: the prompt steps' pieces compiled before any request, in the sink block
        graphs._warm_up_prompt_steps()
        assert graphs.fused is not None
        assert not any(cache[:20].any() for cache in (*graphs.kv.k, *graphs.kv.v))
        assert all(cache[20].any() for cache in graphs.kv.k)
    chunks = [SeqChunk([1, 2, 3], 0, [0]), SeqChunk([4], 0, [1]), SeqChunk([5], 0, [2])]
    torch.testing.assert_close(step(graphs, chunks), step(eager, chunks), atol=1e-5, rtol=0)
    three_decodes = [SeqChunk([6], 3, [0]), SeqChunk([7], 1, [1]), SeqChunk([8], 1, [2])]
    torch.testing.assert_close(step(graphs, three_decodes), step(eager, three_decodes), atol=1e-5, rtol=0)
    assert (graphs.fused is not None) == fuse


@pytest.mark.parametrize("piece", ["first", "between", "merge_between"])
def test_compiled_pieces_store_k_v_in_the_cache_in_place(make_checkpoint, device, piece, monkeypatch):
    """The CUDA runner's compiled pieces write the K/V they make into the layer's cache: in place, as
    part of a fused kernel, never through a copy of the cache (as big as the card's free memory). On
    a GPU, no kernel that writes the cache is timed by inductor's autotuner (on a copy of the cache)."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch._inductor.utils import run_and_get_code

    from glm4serve.model import compiled_layers, segments
    from glm4serve.model.kv_cache import KVCache
    from glm4serve.model.paged_decode import merge_splits

    model = load_model(make_checkpoint("glm4", shape="small"), dtype="float32", device=device)
    cfg, layers = model.cfg, model.layers
    kv = KVCache(cfg, 53, 4, torch.float32, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.hidden_size, generator=g).to(device)
    cos, sin = model.rotary(torch.tensor([0, 5, 9], device=device))
    slots = torch.tensor([0, 5, 197], device=device)
    partials = (torch.randn(3, cfg.num_kv_heads, 4, 16, cfg.head_dim, generator=g).to(device),
                torch.randn(3, cfg.num_kv_heads, 4, 16, generator=g).to(device),
                torch.rand(3, cfg.num_kv_heads, 4, 16, generator=g).to(device) + 0.5)
    attn = merge_splits(*partials, cfg.num_heads).flatten(1)  # [3, Hq * D]
    fn, args, want = {
        "first": (compiled_layers._first, (layers[0], x, cos, sin), segments.first(layers[0], x, cos, sin)),
        "between": (compiled_layers._between, (layers[0], layers[1], x, attn, cos, sin),
                    segments.between(layers[0], layers[1], x, attn, cos, sin)),
        "merge_between": (compiled_layers._merge_between, (layers[0], layers[1], x, partials, cos, sin),
                          segments.between(layers[0], layers[1], x, attn, cos, sin)),
    }[piece]

    def this_tests_own(*args):  # a code object no runner compiled: its code is made here, whatever ran before
        return fn(*args)

    timed_writers = []
    timed = CachingAutotuner.benchmark_all_configs

    def benchmark_all_configs(self, *args, **kwargs):
        timed_writers.extend(self.mutated_arg_names)
        return timed(self, *args, **kwargs)

    monkeypatch.setattr(CachingAutotuner, "benchmark_all_configs", benchmark_all_configs)
    # made and timed here, not taken from inductor's caches on disk
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        got, codes = run_and_get_code(compiled_layers.compile_piece(this_tests_own), *args, kv.k_slots[1],
                                      kv.v_slots[1], slots)
    assert not timed_writers
    torch.testing.assert_close(got, want[:-2] if len(want) > 3 else want[0])  # (x,) q
    torch.testing.assert_close(kv.k_slots[1][slots], want[-2])
    torch.testing.assert_close(kv.v_slots[1][slots], want[-1])
    assert kv.k_slots[1][1:5].abs().sum() == 0  # nothing else written
    sizes = [math.prod(int(n) for n in shape.split(",") if n.strip())
             for code in codes for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", code)]
    assert sizes and max(sizes) < kv.k[1].numel(), codes[0][-3000:]  # no buffer the cache's size


def test_compiled_layers_compile_at_load_not_while_serving(make_checkpoint, device, kernel_runs):
    """What the capture compiles (every decode size of the ladder, then two prompt steps) covers the
    steps a server then runs: decodes of any batch (padded), prompt chunks of any length, mixed
    steps. A compile while serving would stall every running stream for seconds."""
    from torch._dynamo.utils import counters

    model = load_model(make_checkpoint("glm4", shape="small"), dtype="float32", device=device)
    runner = CudaGraphRunner(model, 40, 4, None, max_num_seqs=8, max_model_len=64, capture=False)
    for size in reversed(runner.sizes):  # as _capture does, without capturing (a CPU has no graphs)
        runner.buffers.fill([], size)
        runner._warm_up(size)
    runner._warm_up_prompt_steps()
    compiled = counters["stats"]["unique_graphs"]
    tables = [list(range(i * 5, i * 5 + 5)) for i in range(8)]
    steps = [[SeqChunk(list(range(1, 12)), 0, tables[0])],  # a prompt
             [SeqChunk(list(range(1, 7)), 0, tables[i]) for i in (1, 2)] + [SeqChunk([3], 11, tables[0])],  # mixed
             [SeqChunk([4], 12, tables[0]), SeqChunk([5], 6, tables[1]), SeqChunk([6], 6, tables[2])],  # 3 -> 4
             [SeqChunk([7], 13, tables[0])],
             [SeqChunk([8], 14, tables[0]), SeqChunk([9], 7, tables[1])],
             [SeqChunk(list(range(2, 19)), 0, tables[3])] + [SeqChunk([1], 15, tables[0])]]
    for chunks in steps:
        runner.execute(ScheduledBatch(chunks))
    assert runner.fused is not None and counters["stats"]["unique_graphs"] == compiled


def test_a_failed_capture_of_the_compiled_layers_captures_the_layers_as_written(make_checkpoint, device, caplog):
    """A graph that cannot hold what inductor made leaves a server whose graphs replay the model's own
    layers (and says so), not none; without compiled layers to fall back from, the failure stands."""
    model = load_model(make_checkpoint("glm4", shape="small"), dtype="float32", device=device)
    runner = CudaGraphRunner(model, 40, 4, None, max_num_seqs=2, max_model_len=64, capture=False)
    captures = []

    def capture_ladder():
        captures.append((runner.fused is not None, dict(runner.graphs)))
        runner.graphs[2] = "a graph"
        if runner.fused is not None:
            raise RuntimeError("operation not permitted when stream is capturing")

    runner._capture_ladder = capture_ladder
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        runner._capture()
    assert captures == [(True, {}), (False, {})] and runner.fused is None  # nothing kept of the failed try
    assert "capturing the compiled layers failed" in caplog.text and "not permitted" in caplog.text
    runner.graphs.clear()
    runner._capture_ladder = lambda: 1 / 0
    with pytest.raises(ZeroDivisionError):
        runner._capture()


def record_kernel_specializations(monkeypatch) -> list[str]:
    """Each later launch of the decode kernel appends its specialization: the key by which a GPU's
    Triton compiles a variant of the kernel (integers' ==1 and divisibility by 16, pointers' alignment),
    computed by Triton's own binder for an H100, which needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from glm4serve.model import paged_decode

    kernel = paged_decode._kernel()
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)  # the interpreter's
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    seen = []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(str(binder(*args, **kwargs)[1]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(paged_decode, "_kernel", Recording)
    return seen


def test_decode_kernel_compiles_at_load_not_while_serving(make_checkpoint, device, kernel_runs, monkeypatch):
    """Every variant of the attention kernel that prompt and mixed steps launch (decodes of any count,
    block tables as wide as their longest context, 1 included) is one the decode steps of the capture
    compiled: on an H200 each new variant stalls the step for a compile. An odd max_num_seqs puts the
    graph buffers' context lengths off a 16-byte boundary."""
    seen = record_kernel_specializations(monkeypatch)
    model = load_model(make_checkpoint("glm4", shape="small"), dtype="float32", device=device)
    runner = CudaGraphRunner(model, 40, 4, None, max_num_seqs=5, max_model_len=64, capture=False, fuse=False)
    for size in reversed(runner.sizes):  # as _capture does, without capturing (a CPU has no graphs)
        runner.buffers.fill([], size)
        runner._warm_up(size)
    at_load = len(seen)
    tables = [list(range(i * 5, i * 5 + 5)) for i in range(8)]
    steps = [[SeqChunk([1, 2, 3], 0, tables[0]), SeqChunk([4], 0, tables[1])],
             [SeqChunk([5, 6], 3, tables[0])] + [SeqChunk([7], 1, tables[1])],  # a context of one block
             [SeqChunk(list(range(1, 12)), 0, tables[2])] + [SeqChunk([1], 5, tables[0]), SeqChunk([2], 2, tables[1])],
             [SeqChunk(list(range(1, 4)), 0, tables[3])] + [SeqChunk([3], 11, tables[2])],  # three blocks
             [SeqChunk([1], 0, tables[4])]
             + [SeqChunk([4], c, tables[i]) for i, c in ((0, 6), (1, 3), (2, 12), (3, 3))],
             [SeqChunk([5], c, tables[i]) for i, c in ((0, 7), (1, 4), (2, 13), (3, 4), (4, 1))]]
    for chunks in steps:
        runner.execute(ScheduledBatch(chunks))
    assert len(seen) > at_load + len(steps) - 1
    assert set(seen[at_load:]) <= set(seen[:at_load])


def test_engine_over_the_graph_runner_gives_the_eager_runners_tokens(make_checkpoint, device, kernel_runs):
    """Through the engine: a pool small enough to preempt, n=3 forks copying a shared block, sequences
    joining and leaving the decode batch (batch sizes padded up): the same greedy tokens."""
    from glm4serve.engine.block_pool import BlockPool
    from glm4serve.engine.engine import LLMEngine
    from glm4serve.engine.types import SamplingParams
    from glm4serve.model.tokenizer import Tokenizer
    from tests.engine_fakes import RecordingRunner, sched_config
    from tests.test_engine_with_model import drive

    path = make_checkpoint("glm4", "hf", "wide")
    tokenizer = Tokenizer.from_dir(path)
    model = load_model(path, dtype="float32", device=device)
    g = torch.Generator().manual_seed(2)
    greedy = dict(temperature=0.0, ignore_eos=True)
    requests = [(name, torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist(),
                 SamplingParams(max_tokens=k, n=choices, **greedy))
                for name, n, k, choices in (("a", 13, 12, 1), ("n3", 10, 9, 3), ("b", 30, 6, 1), ("c", 5, 14, 1))]
    graphs = CudaGraphRunner(model, 14, 4, tokenizer.vocab_size, max_num_seqs=6, max_model_len=48,
                             capture=device == "cuda", fuse=device == "cuda")
    sizes = []  # the padded batch size of every decode step the graph path ran
    fill = graphs.buffers.fill
    graphs.buffers.fill = lambda chunks, size: (sizes.append(size), fill(chunks, size))
    results = []
    for runner in (graphs, EagerRunner(model, 14, 4, tokenizer.vocab_size)):
        recording = RecordingRunner(runner)
        cfg = sched_config(max_num_seqs=6, max_num_batched_tokens=8, max_model_len=48, block_size=4)
        engine = LLMEngine(recording, tokenizer, cfg, BlockPool(14, 4), tokenizer.stop_token_ids)
        results.append((drive(engine, requests), engine.stats().num_preemptions_total, recording))
    (ours, preempted, r1), (theirs, _, r2) = results
    assert preempted > 0 and r1.copies > 0
    assert len(sizes) > 10 and len(set(sizes)) >= 3, sizes
    assert min(r1.min_gap, r2.min_gap) > 1e-4, "a near tie: pick another seed"
    assert ours == theirs


def test_a_failed_timing_of_the_one_row_products_leaves_them_to_cublas(make_checkpoint, monkeypatch):
    """Timing each product's candidates at load (fastest_one_row_kernels): a product whose timing fails
    stays cuBLAS's; the others get what the timing chose, where it beat cuBLAS's; every product timed
    has its fastest blocks for the folded step whatever cuBLAS's time."""
    from glm4serve.model import gemv, one_row

    model = load_model(make_checkpoint("glm", shape="small"), dtype="float32", device="cpu")

    def fastest(weights):
        if weights[0].shape[0] == model.cfg.vocab_size:
            raise RuntimeError("no graph here")
        beats = weights[0] is model.layers[0].mlp.down.weight
        best = Blocks(4, 512, 2)
        return (best if beats else None), best, {"cublas": {"us": 1.0}, str(best): {"us": 0.5 if beats else 2.0}}

    monkeypatch.setattr(gemv, "fastest", fastest)
    chosen, best = one_row.fastest_one_row_kernels(model)
    assert chosen == {"down": Blocks(4, 512, 2)}
    assert best == dict.fromkeys(("qkv", "o", "gate_up", "down"), Blocks(4, 512, 2))


@pytest.mark.parametrize("fuse", [False, True], ids=["as-written", "fused"])
def test_a_fixed_set_of_adapters_in_slots_gives_the_products_of_their_rows(make_checkpoint, device, tolerances,
                                                                           kernel_runs, tmp_path, fuse):
    """LoRA on the CUDA graph runner: every adapter's pairs stacked in slots, each row weighting the
    slots by its adapter (lora.LoRASlots), against the eager runner picking each adapter's rows on the
    host. Prompts and decodes with two adapters (of different ranks and targets) and the base model in
    one batch, and one sequence alone (the one-row graph), padded batches too."""
    from glm4serve.model.lora import load_loras
    from glm4serve.model.random_checkpoint import write_random_adapter

    path = make_checkpoint("glm", shape="small")
    adapters = {"all": str(write_random_adapter(tmp_path / "all", path, rank=4, seed=1)),
                "attn": str(write_random_adapter(tmp_path / "attn", path, rank=2, targets=("attn.qkv", "attn.o"),
                                                 seed=2))}
    block_size, num_blocks = 4, 40
    slotted = load_model(path, dtype="float32", device=device)
    graphs = CudaGraphRunner(slotted, num_blocks, block_size, None, max_num_seqs=4, max_model_len=64,
                             capture=device == "cuda", fuse=fuse, loras=load_loras(adapters, slotted, runtime=False))
    assert graphs.loras.slots is not None and graphs.loras.fixed
    assert not any(graphs.loras.adapters["all"].pieces.values())  # one copy of the pairs: the slots
    plain = load_model(path, dtype="float32", device=device)
    eager = EagerRunner(plain, num_blocks, block_size)
    eager.loras = load_loras(adapters, plain)
    eager.loras.attach(plain)
    g = torch.Generator().manual_seed(3)
    names = ["all", None, "attn", "all"]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(4)]
    lens = [6, 5, 9, 3]
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in lens]
    first = [SeqChunk(p, 0, t, lora=name) for p, t, name in zip(prompts, tables, names)]
    ours, theirs = step(graphs, first[:3]), step(eager, first[:3])
    tolerances["float32"].assert_close(ours, theirs)
    ours, theirs = step(graphs, first[3:]), step(eager, first[3:])
    tolerances["float32"].assert_close(ours, theirs)

    def decode(rows, t):
        return [SeqChunk([(5 * i + t) % 500], lens[i] + t, tables[i], lora=names[i]) for i in rows]

    for t, rows in enumerate([[0, 1, 2, 3], [0, 1, 2], [2], [0], [1], [3, 2]]):  # 4, 3 (padded to 4), one row
        ours, theirs = step(graphs, decode(rows, t)), step(eager, decode(rows, t))
        tolerances["float32"].assert_close(ours, theirs)
    # and the adapters change the model: the test would pass vacuously otherwise
    base = EagerRunner(load_model(path, dtype="float32", device=device), num_blocks, block_size)
    without = step(base, [SeqChunk(prompts[0], 0, tables[0])])
    assert (without - step(eager, [SeqChunk(prompts[0], 0, tables[0], lora="all")])).abs().max() > 1e-2
