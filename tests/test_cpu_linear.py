"""fp32 and bf16 CPU linears (model/cpu_linear.py): a weight packed by oneDNN, or plain for one-row
reductions inside a compiled graph or bf16_gemm.c's few-row products, never both. Every way must give
F.linear's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm4serve.model import bf16_kernel, cpu_linear
from glm4serve.model.cpu_linear import (CpuLinear, hugepage_backing, hugepage_copy, hugepage_empty, packing_available,
                                        swap_linears)
from glm4serve.model.cpu_runner import compiler_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear packing")
needs_compiler = pytest.mark.skipif(not compiler_available(), reason="inductor needs a C++ compiler")
needs_bf16_kernel = pytest.mark.skipif(not bf16_kernel.available(), reason="no AVX-512 BF16 or no C compiler")


def linear(out_f: int, in_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def assert_close(got: torch.Tensor, want: torch.Tensor):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_packed_equals_f_linear(bias, rows):
    lin = linear(96, 64, bias)
    packed = CpuLinear(lin, plain=False)
    assert packed.plain is None and packed.weight.is_mkldnn  # one copy, in oneDNN's layout
    x = torch.randn(rows, 64)
    assert_close(packed(x), F.linear(x, lin.weight, lin.bias))


@needs_compiler
@pytest.mark.parametrize("bias", [False, True])
def test_a_plain_weight_serves_batches_eagerly_and_one_row_inside_a_graph(bias):
    lin = linear(200, 48, bias, seed=1)
    plain = CpuLinear(lin, plain=True)
    assert plain.weight is plain.plain and not plain.weight.is_mkldnn  # one copy, read by oneDNN and the graph
    for rows in (1, 3, 32):
        x = torch.randn(rows, 48)
        assert_close(plain(x), F.linear(x, lin.weight, lin.bias))
    x = torch.randn(1, 48)
    graph = torch.compile(lambda layer, x: layer(x) * 2, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        assert_close(graph(plain, x), 2 * F.linear(x, lin.weight, lin.bias))


@needs_bf16_kernel
@pytest.mark.parametrize("out_f, in_f", [(4608, 4096), (2270, 64), (7, 96), (3, 32), (96, 13696)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_decode_batches_run_in_the_kernels_exactly_rounded(out_f, in_f, bias, monkeypatch):
    """Rows 1 to bf16_kernel.max_rows(weight) in bf16_gemm.c: 1-4 in vector instructions, up to 128 on AMX tiles
    where the CPU has them and the weight's rows are a multiple of 32 (else 4 at most, the rest oneDNN's); without
    AMX up to 48 in vector instructions. The fp32 sum is rounded once to bf16, so within one bf16 step of the fp32
    product's rounding (the order of the fp32 sums differs), and a row's result is the same alone or in a batch;
    more rows in oneDNN over the same plain weight. Weights whose rows are not a multiple of 4 take the vector
    kernel's tail path."""
    lin = linear(out_f, in_f, bias, seed=2).to(torch.bfloat16)
    layer = CpuLinear(lin, plain=False)
    on_tiles = bf16_kernel.amx_available() and out_f % 32 == 0
    max_rows = (bf16_kernel.AMX_MAX_ROWS if on_tiles else bf16_kernel.VECTOR_ROWS if bf16_kernel.amx_available()
                else bf16_kernel.VECTOR_ROWS_NO_AMX)
    assert layer.kernel_rows == bf16_kernel.max_rows(lin.weight) == max_rows
    assert not layer.weight.is_mkldnn  # one plain copy
    calls, tiles, lib = [], [], bf16_kernel._library()
    monkeypatch.setattr(bf16_kernel, "matmul", lambda *a, f=bf16_kernel.matmul: calls.append(1) or f(*a))
    if hasattr(lib, "bf16_amx_gemm"):  # not where the compiler lacks the AMX targets
        monkeypatch.setattr(lib, "bf16_amx_gemm", lambda *a, f=lib.bf16_amx_gemm: tiles.append(a[5]) or f(*a))
    all_rows = (1, 2, 3, 4, 5, 9, 16, 17, 40, 128, 129)
    for rows in all_rows:
        x = torch.randn(rows, in_f).to(torch.bfloat16)
        want = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_f)
        step = want.abs().clamp_min(1e-3) * 2**-7  # one bf16 step at the value
        assert ((got.float() - want).abs() <= step).all(), rows
        if rows <= (bf16_kernel.VECTOR_ROWS if on_tiles else max_rows):  # the vector kernel: a row's sums in any pass
            for i in (0, rows // 2, rows - 1):
                assert torch.equal(layer(x[i:i + 1]), got[i:i + 1]), (rows, i)
                calls.pop()
    kernel_rows = [rows for rows in all_rows if rows <= max_rows]
    assert len(calls) == len(kernel_rows)
    assert tiles == ([rows for rows in kernel_rows if rows > bf16_kernel.VECTOR_ROWS] if on_tiles else [])


@pytest.mark.skipif(not bf16_kernel.available(), reason="no AVX-512 BF16 or no C compiler")
def test_bf16_batches_go_to_the_tiles_where_the_cpu_has_amx_bf16():
    """Where the CPU has AMX-BF16 (and Linux grants its tiles), the kernels take decode batches up to AMX_MAX_ROWS
    with a weight whose rows are a multiple of 32 (as GLM-4's are), 4 rows with another."""
    amx_cpu = bf16_kernel.cpu_has(bf16_kernel.AMX_CPU_FLAGS)
    if amx_cpu and not hasattr(bf16_kernel._library(), "bf16_amx_gemm"):
        pytest.skip("this C compiler lacks the AMX targets (GCC 10): the vector kernel alone is built")
    assert bf16_kernel.amx_available() == amx_cpu
    glm4, odd = torch.empty(4608, 4096, dtype=torch.bfloat16), torch.empty(1712 + 8, 4096, dtype=torch.bfloat16)
    assert bf16_kernel.max_rows(glm4) == (bf16_kernel.AMX_MAX_ROWS if amx_cpu else bf16_kernel.VECTOR_ROWS_NO_AMX)
    assert bf16_kernel.max_rows(odd) == (bf16_kernel.VECTOR_ROWS if amx_cpu else bf16_kernel.VECTOR_ROWS_NO_AMX)


@needs_bf16_kernel
def test_a_bf16_library_built_without_the_amx_targets_keeps_its_vector_kernel(monkeypatch):
    """A compiler without the AMX targets (GCC 10) builds bf16_gemm.c as -DNO_AMX does: the vector kernel alone,
    which then takes batches of up to VECTOR_ROWS_NO_AMX rows, 4 rows at a time."""
    import ctypes

    from glm4serve.model import int8_kernel

    path = int8_kernel._build(int8_kernel._compiler(), bf16_kernel.SOURCE, [*bf16_kernel.FLAGS, "-DNO_AMX"])
    lib = ctypes.CDLL(str(path))
    assert not hasattr(lib, "bf16_amx_gemm")
    lib.bf16_gemm.argtypes = bf16_kernel._library().bf16_gemm.argtypes
    monkeypatch.setattr(bf16_kernel, "_library", lambda: lib)
    bf16_kernel.amx_available.cache_clear()
    try:
        w, x = torch.randn(64, 96).to(torch.bfloat16), torch.randn(9, 96).to(torch.bfloat16)
        assert not bf16_kernel.amx_available() and bf16_kernel.max_rows(w) == bf16_kernel.VECTOR_ROWS_NO_AMX
        want = x.float() @ w.float().T
        assert ((bf16_kernel.matmul(x, w, None).float() - want).abs() <= want.abs().clamp_min(1e-3) * 2**-7).all()
    finally:
        bf16_kernel.amx_available.cache_clear()


@needs_bf16_kernel
def test_bf16_weights_the_kernel_cannot_take_stay_packed():
    assert CpuLinear(linear(8, 48, False).to(torch.bfloat16), plain=False).weight.is_mkldnn  # 48 % 32 != 0
    off = CpuLinear(linear(8, 64, False).to(torch.bfloat16), plain=False, bf16_kernel_rows=0)
    assert off.weight.is_mkldnn and off.plain is None
    assert CpuLinear(linear(8, 64, False), plain=False).weight.is_mkldnn  # fp32


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_bf16_weights_stay_plain_where_onednn_has_no_bf16(rows, monkeypatch):
    """Where oneDNN refuses bf16 (CPUs with AVX2 alone), a bf16 weight is neither packed nor multiplied by it:
    plain, through F.linear. fp32 is packed as ever."""
    monkeypatch.setattr(cpu_linear, "onednn_takes", lambda dtype: dtype != torch.bfloat16)
    lin = linear(96, 64, True).to(torch.bfloat16)
    plain = CpuLinear(lin, plain=False, bf16_kernel_rows=0)
    assert plain.plain is not None and not plain.weight.is_mkldnn
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    assert torch.equal(plain(x), F.linear(x, lin.weight, lin.bias))
    assert CpuLinear(linear(96, 64, False), plain=False).weight.is_mkldnn


@pytest.mark.parametrize("out_f, in_f", [(4608, 4096), (7, 96), (3, 32), (96, 13696)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_products_run_in_the_avx2_kernel_where_the_cpu_has_no_avx512_bf16(out_f, in_f, bias, monkeypatch):
    """Without AVX-512 BF16 (bf16_kernel's AVX-512 kernels absent) every bf16 product of a plain weight runs in
    bf16_gemm_avx2 (the weight widened to fp32 as it is read): the fp32 sum rounded once, so within one bf16 step of
    the fp32 product's rounding; weight rows not a multiple of 4 take its tail path. Activation rows go a pass of
    AVX2_PASS_BYTES at a time (76 rows of 13,696 inputs): a row's result is the same, bit for bit, whichever pass and
    wherever in it the row falls."""
    monkeypatch.setattr(bf16_kernel, "_library", lambda: None)
    if not bf16_kernel.avx2_available():
        pytest.skip("no AVX2 and FMA here, or no C compiler")
    monkeypatch.setattr(cpu_linear, "onednn_takes", lambda dtype: dtype != torch.bfloat16)
    lin = linear(out_f, in_f, bias, seed=3).to(torch.bfloat16)
    layer = CpuLinear(lin, plain=False)
    assert layer.kernel_rows == bf16_kernel.AVX2_ROWS and not layer.weight.is_mkldnn
    calls = []
    monkeypatch.setattr(bf16_kernel, "matmul", lambda *a, f=bf16_kernel.matmul: calls.append(1) or f(*a))
    for rows in (1, 2, 3, 5, 40, 129):
        x = torch.randn(rows, in_f).to(torch.bfloat16)
        want = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_f)
        assert ((got.float() - want).abs() <= want.abs().clamp_min(1e-3) * 2**-7).all(), rows
        if rows == 129:  # with 13,696 inputs, passes of rows 0-75 and 76-128
            assert torch.equal(got[73:79], layer(x[73:79])) and torch.equal(got[127:], layer(x[127:]))
    assert len(calls) == 6 + 2


BF16_WITHOUT_AVX512 = """
import sys, torch
if torch.ops.mkldnn._is_mkldnn_bf16_supported():
    print("SKIP oneDNN still multiplies bf16 under ONEDNN_MAX_CPU_ISA=AVX2 here"); sys.exit()
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.server import build_llm_engine
engine = build_llm_engine(EngineArgs(model=sys.argv[1], dtype="bfloat16", num_kv_blocks=32, block_size=4))
engine.add_request("a", [11, 23, 5, 99], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
tokens = []
while engine.has_work:
    tokens += [t for o in engine.step() for t in o.token_ids]
print("TOKENS", len(tokens), repr(engine.runner))
"""


def test_a_bf16_model_loads_and_decodes_where_onednn_has_no_bf16(make_checkpoint):
    """oneDNN held to AVX2 refuses to pack bf16 weights (as on most desktop CPUs): the model still loads, in
    plain bf16 weights, and decodes."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLM4SERVE_MAX_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", BF16_WITHOUT_AVX512, str(make_checkpoint("glm4", "hf", "wide"))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout[5:].strip())
    assert "TOKENS 8 CpuRunner(torch.bfloat16, CpuLinear" in out.stdout


def test_swapping_frees_each_old_weight_before_copying_the_next(monkeypatch):
    """Loading holds one weight twice at most, never the whole model twice (glm-4-9b in bf16 is
    18.8 GB: twice that does not fit a 24 GB box)."""
    import weakref

    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)) for _ in range(3)))
    old = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    alive, init = [], CpuLinear.__init__
    monkeypatch.setattr(CpuLinear, "__init__",
                        lambda self, *a, **kw: alive.append(sum(w() is not None for w in old)) or init(self, *a, **kw))
    assert swap_linears(model, plain_for=()) == 6
    assert alive == [6, 5, 4, 3, 2, 1] and all(w() is None for w in old)


def test_hugepage_memory_is_aligned_zeroed_and_outlives_its_source():
    import gc

    src = torch.randn(300, 700)
    copy = hugepage_copy(src)
    want = src.clone()
    del src
    gc.collect()
    assert copy.is_contiguous() and copy.shape == (300, 700) and copy.data_ptr() % (2 << 20) == 0
    assert torch.equal(copy, want)
    empty = hugepage_empty((5, 1 << 19), torch.bfloat16)
    assert empty.dtype == torch.bfloat16 and empty.shape == (5, 1 << 19) and not empty.any()


SMAPS = """\
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0
Size:              10240 kB
Rss:                6144 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac hg
7f0000a00000-7f0000c00000 rw-p 00000000 00:00 0
Rss:                2048 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac
55ecf3308000-55ecf330a000 r--p 00000000 fe:00 260386                     /usr/bin/head
Rss:                   8 kB
AnonHugePages:         0 kB
VmFlags: rd mr mw me
7f0000e00000-7f0001200000 rw-p 00000000 00:00 0
Rss:                4096 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac hg
"""


def test_hugepage_backing_counts_only_the_memory_that_asked_for_huge_pages():
    # the two `hg` mappings: 4 of 6 MiB backed, and 0 of 4; the unadvised one's huge pages are not counted
    assert hugepage_backing(SMAPS) == (4 << 20, 10 << 20)
    assert hugepage_backing("") == (0, 0)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="not Linux")
def test_hugepage_backing_sees_written_hugepage_memory():
    before = hugepage_backing()
    weight = hugepage_empty((32 << 20,), torch.uint8)  # untouched: not resident
    assert hugepage_backing()[1] - before[1] < 4 << 20
    weight.fill_(1)
    backed, resident = hugepage_backing()
    assert resident - before[1] >= 32 << 20 and 0 <= backed <= resident


_SHAPES_PROBE = """
import ctypes, sys, torch
from glm4serve.model.cpu_linear import limit_onednn_caches
if sys.argv[1] == "limited":
    limit_onednn_caches(8)
libc = ctypes.CDLL("libc.so.6")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
# CpuLinear's packed product, in bf16 where oneDNN multiplies it (AVX-512), else in fp32 (AVX2 CPUs)
dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
w, x = torch.randn(256, 256, dtype=dtype), torch.randn(700, 256, dtype=dtype)
w = torch.ops.mkldnn._reorder_linear_weight(w, 32)
product = lambda rows: torch.ops.mkldnn._linear_pointwise(x[:rows], w, None, "none", [], "")
product(500)
libc.malloc_trim(0)
before = rss()
for rows in range(501, 701):  # a prefill chunk of every length
    product(rows)
libc.malloc_trim(0)
print(rss() - before)
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not Path("/proc/self/statm").exists(),
                    reason="oneDNN's caches, measured from Linux's /proc")
def test_onednn_keeps_a_bounded_number_of_product_shapes():
    """Each product shape leaves ~0.7 MiB here in oneDNN's and ideep's caches: 200 of them ~130 MiB
    unbounded, a handful once capped."""
    def growth(mode: str) -> float:
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", _SHAPES_PROBE, mode], env=env, capture_output=True, text=True,
                             check=True)
        return float(out.stdout.strip())

    unbounded, limited = growth("default"), growth("limited")
    assert unbounded > 60, unbounded  # the probe sees the caches at all
    assert limited < 20, (limited, unbounded)
