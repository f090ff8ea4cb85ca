"""gemv.py's Triton kernel for one row times a weight, on the test device (on CPU in Triton's
interpreter): F.linear's product for weights whose rows and input dims are not whole blocks, with
and without a bias; a well-formed custom op (its fake, its schema); and called from a piece compiled
by inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm4serve.model.gemv import SWEEP, Blocks, linear, pick, row_product, row_product_kv
from tests.gpu_compile import compiled_in_a_fresh_process, each_compiled

# (weight rows, input dims, blocks): rows past the last whole block, input dims past the last whole
# step (4 of 100), both, whole blocks, and fewer rows than one block
CASES = [(37, 128, Blocks(8, 32, 4)), (64, 100, Blocks(16, 32, 4)), (40, 1000, Blocks(16, 512, 8)),
         (64, 256, Blocks(8, 64, 4)), (3, 64, Blocks(32, 512, 8))]


def operands(n, k, bias, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype).to(device) for shape in ((1, k), (n, k), (n,)))
    return x, w, b if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("n,k,blocks", CASES, ids=lambda c: str(c))
def test_the_kernel_is_f_linear_of_one_row(device, kernel_runs, n, k, blocks, bias, dtype):
    x, w, b = operands(n, k, bias, dtype, device)
    y = linear(x, w, b, blocks)
    assert y.shape == (1, n) and y.dtype == dtype
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # [1, n]
    # fp32: summation order; bf16: the output's rounding (2^-8 of it) and fp32 sums, as cuBLAS's
    tol = {torch.float32: 1e-4, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)


def folded_reference(x, w, b, norm, rotary, swiglu, residual):
    """What the model's own modules make of one row (glm4.py): norm, product, rotary, SwiGLU, residual."""
    from glm4serve.model.glm4 import SwiGLU, rotate

    y = F.linear(norm(x) if norm is not None else x, w, b)
    if rotary is not None:
        cos, sin, rotated = rotary
        d = cos.shape[-1]
        y = torch.cat([rotate(y[:, :rotated].view(1, -1, d), cos, sin).flatten(1), y[:, rotated:]], 1)
    if swiglu:
        y = SwiGLU()(y)
    return y + residual if residual is not None else y


# (weight rows, input dims, blocks, what is folded in): qkv's (two heads of 16 with 8 rotated, the third
# not, rows not whole blocks), gate_up's, o's and down's, the output layer's
FOLDED = [(48, 100, Blocks(8, 32, 4), "norm bias rotary"), (40, 96, Blocks(2, 64, 4), "norm bias rotary"),
          (56, 100, Blocks(4, 32, 4), "norm swiglu"), (48, 130, Blocks(16, 64, 4), "norm swiglu"),
          (37, 100, Blocks(8, 32, 4), "residual"), (37, 100, Blocks(8, 32, 4), "norm")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,k,blocks,folded", FOLDED, ids=lambda c: str(c))
def test_the_kernel_folds_in_what_comes_before_and_after_a_product(device, kernel_runs, n, k, blocks, folded, dtype):
    """The norm of the input, the rotary of q and k heads, SwiGLU and the residual add, each where asked
    (one_row.py's folded decode layer): as the model's own modules make them. In fp32 to summation
    order; in bf16 no further from the exact product than the modules are (the kernel scales by 1/rms
    after the product, in fp32, where RMSNorm rounds its output to bf16 before it)."""
    from glm4serve.model.glm4 import RMSNorm, Rotary

    x, w, b = operands(n, k, "bias" in folded, dtype, device, seed=n + k)
    w = w / 4
    g = torch.Generator().manual_seed(1)
    norm = rotary = residual = None
    if "norm" in folded:
        norm = RMSNorm(k, 1e-5).to(dtype).to(device)
        norm.weight.data = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    if "rotary" in folded:
        cos, sin = Rotary(8, 10000.0, 16).to(device)(torch.tensor([1000], device=device))  # [1, 16] each
        rotary = (cos, sin, 32)
    if "residual" in folded:
        residual = torch.randn(1, n, generator=g).to(dtype).to(device)
    swiglu = "swiglu" in folded
    y = linear(x, w, b, blocks, norm=(norm.weight, norm.eps) if norm else None, rotary=rotary, swiglu=swiglu,
               residual=residual)
    assert y.shape == (1, n // 2 if swiglu else n) and y.dtype == dtype

    def f64(m):
        return m.double() if m is not None else None

    with torch.no_grad():
        ours = folded_reference(x, w, b, norm, rotary, swiglu, residual)
        exact = folded_reference(f64(x), f64(w), f64(b), norm.double() if norm else None,
                                 (f64(cos), f64(sin), 32) if rotary else None, swiglu, f64(residual))
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, rtol=1e-4, atol=1e-4 * scale)
    else:
        # one rounding of an intermediate the other way: an ulp (2^-7) of the values, ~2^-6 of the largest
        assert (y.double() - exact).abs().max() <= 2 * (ours.double() - exact).abs().max() + 2**-6 * scale


@pytest.mark.parametrize("blocks", [Blocks(8, 32, 4), Blocks(2, 64, 4), Blocks(32, 512, 8)], ids=str)
def test_the_kernel_stores_k_and_v_into_the_cache_at_the_slot(device, kernel_runs, blocks):
    """qkv's product with the K/V store (one_row.py's folded qkv): the same output as without it, and
    its last 2 x Hkv x D values (k, then v, after the rotary) in the caches' slot rows, nothing else
    written: heads of 16, 2 q heads and 1 KV head, 64 rows (not a whole block of 32 rows from 48 on)."""
    from glm4serve.model.glm4 import Rotary

    x, w, b = operands(64, 100, True, torch.float32, device, seed=3)
    cos, sin = Rotary(8, 10000.0, 16).to(device)(torch.tensor([7], device=device))  # [1, 16] each
    caches = torch.zeros(2, 5, 4, 1, 16, device=device)  # k and v: [blocks, block_size, Hkv, D]
    k_slots, v_slots = caches[0].view(20, 1, 16), caches[1].view(20, 1, 16)
    slot = torch.tensor([13], device=device)
    want = linear(x, w, b, blocks, rotary=(cos, sin, 48))
    got = linear(x, w, b, blocks, rotary=(cos, sin, 48), store_kv=(k_slots, v_slots, slot))
    assert torch.equal(got, want)
    assert torch.equal(k_slots[13].flatten(), want[0, 32:48]) and torch.equal(v_slots[13].flatten(), want[0, 48:])
    k_slots[13], v_slots[13] = 0, 0
    assert not caches.any()  # no other slot written
    with pytest.raises(ValueError, match="qkv"):
        linear(x, w, b, blocks, residual=want, store_kv=(k_slots, v_slots, slot))


def test_the_sweep_and_the_default_blocks_are_launchable():
    """Triton wants power-of-two block sides; the kernel sums each thread's 8 neighbouring columns."""
    for blocks in (Blocks(), *SWEEP):
        assert all(v & (v - 1) == 0 for v in (blocks.rows, blocks.cols, blocks.warps)), blocks
        assert blocks.cols >= 8, blocks
    assert len(set(SWEEP)) == len(SWEEP)


def test_the_op_is_well_formed(device, kernel_runs):
    """Its fake gives the real output's shape, dtype and device (what inductor plans buffers by)."""
    x, w, b = operands(37, 100, True, torch.float32, device)
    torch.library.opcheck(row_product, (x, w, b, 8, 32, 4), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(row_product, (x, w, None, 8, 32, 4), test_utils=("test_schema", "test_faketensor"))
    norm_weight, residual = torch.ones_like(x[0]), torch.zeros(1, 18, device=device)
    out = row_product(x, w[:36], None, 8, 32, 4, norm_weight, 1e-5, True, None, None, 0, residual)  # SwiGLU: half
    assert out.shape == (1, 18)
    torch.library.opcheck(row_product, (x, w[:36], None, 8, 32, 4, norm_weight, 1e-5, True, None, None, 0, residual,
                                        False), test_utils=("test_schema", "test_faketensor"))
    # the K/V store's op: its schema says which tensors it writes (the caches), and which not
    k_slots, v_slots = torch.zeros(2, 3, 1, 16, device=device)
    kv_args = (x, w, b, 8, 32, 4, None, 0.0, None, None, 0, False, k_slots, v_slots, torch.tensor([1], device=device))
    torch.library.opcheck(row_product_kv, kv_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_products_that_follow_each_other_in_a_graph_wait_for_their_inputs(device):
    """On sm_90 each launch may start before the kernel it follows has ended (PDL): a chain of products,
    each reading the one before and one from further back (the residual), replayed from a CUDA graph,
    gives what it gives launched one by one without PDL."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(2048, 2048, generator=g, device="cuda", dtype=torch.bfloat16) / 45 for _ in range(6)]
    x = torch.randn(1, 2048, generator=g, device="cuda", dtype=torch.bfloat16)

    def chain(x, pdl):
        first = y = linear(x, weights[0], None, Blocks(4, 512, 2), pdl=pdl)
        for w in weights[1:]:
            y = linear(y, w, None, Blocks(4, 512, 2), residual=first, pdl=pdl)
        return y

    with torch.inference_mode():
        want = chain(x, pdl=False)
        chain(x, pdl=True)  # compiled off the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(x, pdl=True)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)


def test_a_compiled_piece_calls_the_kernel(device, kernel_runs):
    """Inductor keeps the op as a call of its own and fuses what follows around it."""
    x, w, b = operands(37, 100, True, torch.float32, device)

    def piece(x, w, b):
        return torch.nn.functional.silu(linear(x, w, b, Blocks(8, 32, 4))) * 2

    compiled = torch.compile(piece, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, w, b), F.silu(F.linear(x, w, b)) * 2, rtol=1e-4, atol=1e-4)


# (compute capability, dtype, blocks): every blocks of the sweep on an H100/H200 in bf16; fp16 there,
# and an A100, in the default blocks
TARGETS = [(90, "bf16", b) for b in SWEEP] + [(90, "fp16", Blocks()), (80, "bf16", Blocks())]
# with the options of each product of the folded decode layer (gemv_compiled.FOLDED), in two blocks
TARGETS += [(90, "bf16", b, folded) for folded in ("qkv", "gate_up", "o, down", "lm_head")
            for b in (Blocks(), Blocks(4, 512, 2))]


def compile_for_gpus(targets) -> dict:
    """Compile the kernel for each (capability, dtype, blocks) with Triton's own compiler (ptxas
    included; no GPU needed; benchmarks/gemv_compiled.py) -> {str(target): (barriers inside the input
    loop, shared memory bytes)}, or the error. Run in a process without TRITON_INTERPRET."""
    from benchmarks.gemv_compiled import FOLDED, compile_kernel, loop_barriers

    def one(capability, dtype, blocks, folded="plain"):
        compiled = compile_kernel(blocks, capability, dtype, bias=True, options=FOLDED.get(folded))
        return loop_barriers(compiled), compiled.metadata.shared, compiled.asm["ptx"].count("griddepcontrol.wait")

    return each_compiled(targets, one)


@pytest.fixture(scope="module")
def compiled_for_gpus(device):
    if device == "cuda":
        pytest.skip("with --device cuda the tests here run the kernel compiled for this GPU")
    return compiled_in_a_fresh_process("tests.test_gemv", TARGETS)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "-".join([f"sm{t[0]}", t[1], str(t[2]), *t[3:]]))
def test_the_kernel_compiles_for_the_gpus_it_runs_on_with_no_barrier_in_its_loop(target, compiled_for_gpus):
    """The interpreter runs the kernel's Python; compiling it catches what only a GPU would show. And
    the loop over the input dim keeps every warp on its own: a barrier there (the input loaded in a
    layout of its own and passed between warps through shared memory) stalls each step's loads."""
    result = compiled_for_gpus[str(target)]
    assert isinstance(result, list), result
    barriers, shared, waits = result
    assert barriers == 0 and shared <= 64 * 1024, result
    assert waits == (1 if target[0] >= 90 else 0), result  # launched with PDL on sm_90: its one wait


def test_a_product_takes_the_fastest_blocks_that_agree_with_cublas_where_they_beat_it():
    """The runner's load-time choice, from each candidate's time on the GPU and its error there."""
    fast, faster, wrong = Blocks(4, 512, 2), Blocks(8, 512, 4), Blocks(2, 1024, 4)
    timings = {"cublas": 60.0, fast: 55.0, faster: 52.0, wrong: 40.0}
    errors = {fast: 0.004, faster: 0.004, wrong: 0.5}  # `wrong` gave another product: never taken
    assert pick(timings, errors) == faster
    assert pick({**timings, faster: 59.0, fast: 59.5}, errors) is None  # within the margin of cuBLAS's time
    assert pick(timings, {fast: 0.004}) == fast  # one with no error on record did not run: not taken
    assert pick({"cublas": 60.0}, {}) is None  # no candidate ran on this GPU


@pytest.mark.cuda
def test_the_load_time_choice_times_every_candidate_on_this_gpu(device):
    """On the GPU: each candidate timed and checked against cuBLAS on weights of a decode's size."""
    from glm4serve.model.gemv import fastest

    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(4096, 4096, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    blocks, best, report = fastest(weights)
    assert report["cublas"]["us"] > 0
    assert all(report[str(b)]["us"] > 0 and report[str(b)]["error"] < 0.02 for b in SWEEP), report
    assert blocks is None or report[str(blocks)]["us"] < report["cublas"]["us"]
    assert best is not None and report[str(best)]["us"] == min(report[str(b)]["us"] for b in SWEEP)
    assert blocks in (None, best)
