"""Weight-only int8/int4 (model/quant.py): quantized while loading, within half a step of the
checkpoint's weights (int4's steps fitted to the least squared error), the same greedy tokens as plain
PyTorch over the same dequantized weights, and a load that never holds the weights in full precision."""

from __future__ import annotations

import functools
import os
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
from glm4serve.model import int8_kernel, quant
from glm4serve.model.glm4 import load_model
from glm4serve.model.int8_kernel import DEQUANTIZE_MIN_ROWS
from glm4serve.model.quant import Int4Linear, Int8Linear, int4_dequantize_min_rows
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
        else:
            assert_int4_fits(q, w, name)
            continue
        assert ((q.dequantized() - w).abs() <= bound).all(), name
        if q.bias is not None:
            assert torch.equal(q.bias, plain.get_submodule(name).bias)


def assert_int4_fits(q: Int4Linear, w: torch.Tensor, name: str) -> None:
    """Each weight is the nearest of its group's 16 levels (its bf16 scale and zero) where those reach it, and the
    levels are fitted (quant.int4_fit): the squared error no more than that of levels spread over each group's range
    (the same, where int4_fit.c does not build)."""
    n, k = w.shape
    w, got = w.detach().double(), q.dequantized().double()
    scale, zero = (p.repeat_interleave(q.group, dim=1) for p in q.scales_by_row().double().permute(2, 1, 0))
    codes = ((got - zero) / scale + 8).round()
    inside = (codes > 0) & (codes < 15)  # not clamped to the lowest or highest level
    assert ((got - w).abs()[inside] <= (scale / 2 * (1 + 1e-3))[inside]).all(), name
    groups = w.view(n, -1, q.group)
    low, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    spread = (((groups - low) / step).round().clamp(0, 15) * step + low).view(n, k)
    assert ((got - w) ** 2).sum() <= 1.01 * ((spread - w) ** 2).sum(), name  # 1%: the scale and zero's bf16


def _fit_groups(group: int) -> torch.Tensor:
    """3,000 random groups, offset per group, the first on 16 even levels and the second flat."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(3000, group, generator=g) * 0.02 + 0.01 * torch.randn(3000, 1, generator=g)
    w[0] = torch.arange(group) % 16 * 0.125 - 1  # on the levels -1, -0.875, ..., 0.875
    w[1] = 0.5  # a flat group: no spread at all
    return w


@pytest.mark.parametrize("group", [32, 64])
def test_int4_fit_is_the_least_squares_of_its_candidates(group):
    """int4_fit.c picks, per group, the spread and least-squares (scale, minimum) of the smallest squared error:
    never above the range's own levels, well below them in all, and for a group whose weights lie on 16 even levels,
    those levels exactly."""
    w = _fit_groups(group)

    def squared_error(scale, low):
        q = ((w - low[:, None]) / scale[:, None]).round().clamp(0, 15)
        return ((q * scale[:, None] + low[:, None] - w).double() ** 2).sum(-1)

    low, high = w.amin(-1), w.amax(-1)
    spread = squared_error((high - low).clamp(min=1e-12) / 15, low)
    if int8_kernel.int4_fit(w[:1], torch.ones(1)) is None:
        pytest.skip("int4_fit.c is not built here (no C compiler, or no AVX2): the next test covers that case")
    scale, low_fit = quant.int4_fit(w)
    err = squared_error(scale, low_fit)
    assert (err <= spread * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < 0.95 * spread.sum()
    assert scale[0].item() == pytest.approx(0.125, rel=1e-6) and low_fit[0].item() == pytest.approx(-1, abs=1e-6)
    assert err[1].item() == 0 and (scale > 0).all()


def test_without_int4_fit_c_the_levels_are_spread_over_the_range(monkeypatch):
    w = _fit_groups(64)
    low, high = w.amin(-1), w.amax(-1)
    monkeypatch.setattr(int8_kernel, "int4_fit", lambda *a: None)
    scale, low_fit = quant.int4_fit(w)
    assert torch.equal(scale, (high - low).clamp(min=1e-12) / 15) and torch.equal(low_fit, low)


# (out, in) with a partial last tile of 4 rows and inputs that are no multiple of 32, or fewer than 32
KERNEL_SHAPES = [(37, 96), (160, 70), (3, 5), (4608, 4096)]


def test_a_kernel_is_built_again_when_a_header_it_includes_or_the_compiler_changes(tmp_path, monkeypatch):
    """The build cache's key covers the source's own headers (amx_tiles.h), the headers they include, and the
    compiler's version, not the source alone."""
    import ctypes

    compiler = int8_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(int8_kernel, "_cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "k.c").write_text('#include "k.h"\nint n(void) { return N; }\n')
    (tmp_path / "k.h").write_text("#define N 1\n")
    first = int8_kernel._build(compiler, tmp_path / "k.c", ["-shared", "-fPIC"])
    (tmp_path / "k.h").write_text("#define N 2\n")
    second = int8_kernel._build(compiler, tmp_path / "k.c", ["-shared", "-fPIC"])
    assert first != second and ctypes.CDLL(str(second)).n() == 2
    (tmp_path / "k.h").write_text('#include "inner.h"\n')  # a header's own header
    (tmp_path / "inner.h").write_text("#define N 3\n")
    third = int8_kernel._build(compiler, tmp_path / "k.c", ["-shared", "-fPIC"])
    (tmp_path / "inner.h").write_text("#define N 4\n")
    fourth = int8_kernel._build(compiler, tmp_path / "k.c", ["-shared", "-fPIC"])
    assert fourth != third and ctypes.CDLL(str(fourth)).n() == 4
    monkeypatch.setattr(int8_kernel, "_compiler_version", lambda compiler: b"cc (GCC) 10.2.1")
    assert int8_kernel._build(compiler, tmp_path / "k.c", ["-shared", "-fPIC"]) != second  # another compiler


def test_int8_kernel_is_built_where_the_cpu_has_avx512_vnni():
    """Where the CPU has the instructions and a C compiler exists, the kernel builds: a silently failed
    build would leave every int8 model on the slower torch kernel."""
    import shutil

    compiler = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    assert int8_kernel.available() == (int8_kernel.cpu_has(int8_kernel.CPU_FLAGS) and compiler)


def test_int8_amx_kernel_is_built_where_the_cpu_has_amx_int8():
    """Likewise the AMX kernel, wherever the other builds and the CPU has AMX-INT8 (Linux grants its
    tiles to any process that asks)."""
    amx_cpu = int8_kernel.cpu_has(int8_kernel.AMX_CPU_FLAGS)
    assert (int8_kernel._amx_library() is not None) == (int8_kernel.available() and amx_cpu)


AMX_SHAPES = [(32, 64), (96, 192), (4608, 4096)]


@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [2, 16, 17, 33, int8_kernel.AMX_MAX_ROWS - 1])
def test_int8_amx_kernel_gives_the_vnni_kernels_product(shape, rows):
    """The tiles multiply the int16 activations' two bytes separately: the sums are the VNNI kernel's
    integers, so the outputs agree to fp32 rounding, and both are within 1e-4 of the float64 product."""
    if int8_kernel._amx_library() is None:
        pytest.skip("no AMX-INT8 here (or no VNNI kernel): int8 batches take the other paths")
    n, k = shape
    assert int8_kernel.amx_fits(rows, n, k)
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, :] = -127  # the largest sums either kernel can meet
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g)
    x[0, :] = -x[0].abs().max()
    truth = x.double() @ (q.double() * scale.double()[:, None]).T
    got = int8_kernel.int8_amx_matmul(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got, int8_kernel.int8_matmul(x, q, scale), rtol=1e-6, atol=1e-6 * truth.abs().max())
    assert (got.double() - truth).abs().max() <= 1e-4 * truth.abs().max()


@pytest.mark.parametrize("bf16_tiles", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 100, int8_kernel.TILES_MIN_ROWS - 1, int8_kernel.TILES_MIN_ROWS,
                                  int8_kernel.AMX_MAX_ROWS])
def test_int8_linear_rows_take_vnni_amx_or_bf16_by_their_number(rows, bf16_tiles, monkeypatch):
    """One row: the VNNI kernel; 2 to AMX_MAX_ROWS - 1: the tiles (where the CPU has them); from there the
    dequantized bf16 blocks; where the CPU has AMX-BF16, from TILES_MIN_ROWS the bf16 tiles of int8_tiles_gemm
    instead of either. Each gives the product over the dequantized weights."""
    if int8_kernel._amx_library() is None:
        pytest.skip("no AMX-INT8 here (or no VNNI kernel): int8 batches take the other paths")
    if bf16_tiles and not int8_kernel.tiles_available():
        pytest.skip("no AMX-BF16 here: prefill products take the bf16 blocks")
    if not bf16_tiles:
        monkeypatch.setattr(int8_kernel, "_has_tiles_flags", lambda: False)
    inputs = 192
    calls = []
    for name in ("int8_matmul", "int8_amx_matmul", "int8_tiles_matmul", "blockwise_matmul"):
        real = getattr(int8_kernel, name)
        monkeypatch.setattr(int8_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    lin = Int8Linear(inputs, 96, bias=False, dtype=torch.float32)
    lin.load_weight_rows(0, 96, torch.randn(96, inputs))
    x = torch.randn(rows, inputs)
    want = x.double() @ lin.dequantized().double().T
    assert (lin(x).double() - want).abs().max() <= 2e-2 * want.abs().max()
    if bf16_tiles and rows >= int8_kernel.TILES_MIN_ROWS:
        assert calls == ["int8_tiles_matmul"]
    else:
        assert calls == [{1: "int8_matmul", int8_kernel.AMX_MAX_ROWS: "blockwise_matmul"}.get(rows, "int8_amx_matmul")]


@pytest.mark.parametrize("shape", [(32, 32), (96, 64), (160, 4096), (4608, 4096), (64, 4128), (96, 13696)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [int8_kernel.TILES_MIN_ROWS, 200, 513])
def test_int8_tiles_kernel_is_the_bf16_product_of_the_dequantized_weights(shape, rows):
    """int8_tiles_gemm: the weight dequantized as dequantize_bf16 has it, times the bf16 activations, summed in fp32
    and rounded once: each output the float64 product's bf16 (or, at a rounding boundary the fp32 sums' order
    decides, its neighbour), the same for any number of threads (each thread's own weight rows). More than 4,096
    inputs come in chunks, the sums kept between them (4,128: two chunks; glm-4-9b's 13,696: four)."""
    if not int8_kernel.tiles_available():
        pytest.skip("no AMX-BF16 here (or no AMX-INT8 kernel): prefill products take the bf16 blocks")
    n, k = shape
    assert int8_kernel.tiles_fit(rows, n, k)
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    truth = x.double() @ int8_kernel.dequantize_bf16(q, scale).double().T
    assert_tiles_product(lambda: int8_kernel.int8_tiles_matmul(x, q, scale), truth)


def assert_tiles_product(product, truth: torch.Tensor) -> None:
    """The tiles kernels' promise: bf16 outputs, each the float64 product's bf16 or (at a rounding boundary the fp32
    sums' order decides) its neighbour, the same bits at 1 and 3 threads."""
    outs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            outs.append(product())
        finally:
            torch.set_num_threads(2)
    got = outs[0]
    assert got.dtype == torch.bfloat16 and got.shape == truth.shape
    assert torch.equal(outs[0], outs[1])
    fp32_sums = 1e-5 * truth.abs().max()  # the sums' own rounding, which outputs near 0 show
    assert ((got.double() - truth).abs() <= truth.abs() * 2**-8 + fp32_sums).all()  # within one bf16 step
    assert (got != truth.to(torch.bfloat16)).float().mean() < 1e-3


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_int8_kernel_is_the_exact_product_but_for_int16_activations(shape, rows):
    """int8 weights x per-row scales against a float64 product: within 1e-4 of the largest output
    (the int16 rounding of the activations; bf16 activations, torch's kernel, land ~3e-3 away)."""
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int8Linear uses torch's kernel")
    n, k = shape
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)  # as Int8Linear keeps them
    x = torch.randn(rows, k, generator=g)
    truth = x.double() @ (q.double() * scale.double()[:, None]).T
    got = int8_kernel.int8_matmul(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - truth).abs().max() <= 1e-4 * truth.abs().max()


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_dequantize_is_the_bf16_of_the_weights(shape):
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int8Linear uses torch's kernel")
    n, k = shape
    g = torch.Generator().manual_seed(n * k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    assert torch.equal(int8_kernel.dequantize_bf16(q, scale), (q.float() * scale.float()[:, None]).to(torch.bfloat16))


@pytest.mark.parametrize("rows", [1, DEQUANTIZE_MIN_ROWS - 1, DEQUANTIZE_MIN_ROWS, 100])
def test_int8_linear_rows_on_either_path_give_the_product(rows, monkeypatch):
    """A shape the AMX kernel does not take (70 outputs): below DEQUANTIZE_MIN_ROWS rows the VNNI
    kernel, from there dequantized bf16 weights: both within bf16 rounding of the product over the
    dequantized weights."""
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int8Linear uses torch's kernel")
    dequantized = []
    real = int8_kernel.dequantize_bf16
    monkeypatch.setattr(int8_kernel, "dequantize_bf16", lambda *a: dequantized.append(1) or real(*a))
    monkeypatch.setattr(int8_kernel, "DEQUANTIZE_BLOCK_ROWS", 32)  # 70 rows: blocks of 32, 32 and 6
    lin = Int8Linear(160, 70, bias=False, dtype=torch.float32)
    lin.load_weight_rows(0, 70, torch.randn(70, 160))
    x = torch.randn(rows, 160)
    want = x.double() @ lin.dequantized().double().T
    assert (lin(x).double() - want).abs().max() <= 2e-2 * want.abs().max()
    assert len(dequantized) == (3 if rows >= DEQUANTIZE_MIN_ROWS else 0)


def test_blockwise_products_of_several_shapes_reuse_one_buffer(monkeypatch):
    """Shapes in turns (none the AMX kernel takes): each product right, and after the largest the
    thread's scratch buffer is the same memory in every call."""
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int8Linear uses torch's kernel")
    monkeypatch.setattr(int8_kernel, "DEQUANTIZE_BLOCK_ROWS", 32)
    linears = []
    for k, n in [(320, 50), (160, 70), (96, 40)]:
        lin = Int8Linear(k, n, bias=False, dtype=torch.float32)
        lin.load_weight_rows(0, n, torch.randn(n, k))
        linears.append(lin)
    buffers = set()
    for _ in range(2):
        for lin in linears:
            x = torch.randn(DEQUANTIZE_MIN_ROWS + 8, lin.in_features)
            want = x.double() @ lin.dequantized().double().T
            assert (lin(x).double() - want).abs().max() <= 2e-2 * want.abs().max()
            buffers.add(int8_kernel._scratch.bf16.data_ptr())
    assert len(buffers) == 1


@pytest.mark.parametrize("cpu", ["vnni", "no-amx", "amx-int8", "amx"])
@pytest.mark.parametrize("rows", sorted({1, 3, 4, 5, 6, int4_dequantize_min_rows() - 1, int4_dequantize_min_rows(),
                                          int8_kernel.INT4_TILES_MIN_ROWS - 1, int8_kernel.INT4_TILES_MIN_ROWS,
                                          160, 161}))
def test_int4_linear_rows_take_vnni_amx_or_bf16_by_their_number(rows, cpu, monkeypatch):
    """Up to int4_dequantize_min_rows() - 1 rows int4_gemm (VNNI), from there blocks of the weight unpacked from
    torch's int4 layout to bf16 (int8_gemm.c), the product over the dequantized weights within bf16 rounding;
    where the CPU has AMX-INT8, int8_kernel.INT4_AMX_ROWS rows (6 to 160) on its tiles instead, and with AMX-BF16
    too ("amx"), from INT4_TILES_MIN_ROWS (56) on int4_tiles_gemm; where it has no AMX, every row count from
    INT4_INT8_MIN_ROWS (4) through int4_int8_gemm."""
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int4Linear uses torch's kernel")
    if cpu.startswith("amx") and int8_kernel._amx_library() is None:
        pytest.skip("no AMX-INT8 here: int4 batches take the other paths")
    if cpu == "amx" and not int8_kernel.tiles_available():
        pytest.skip("no AMX-BF16 here: int4 prefill products take the bf16 blocks")
    if cpu == "no-amx" and int8_kernel._int4_int8_kernel() is None:
        pytest.skip("int4_int8.c not built here: int4 batches take int16 activations")
    if not cpu.startswith("amx"):
        monkeypatch.setattr(int8_kernel, "_amx_library", lambda: None)
    if cpu == "vnni":
        monkeypatch.setattr(int8_kernel, "_int4_int8_kernel", lambda: None)
    if cpu == "amx-int8":
        monkeypatch.setattr(int8_kernel, "_has_tiles_flags", lambda: False)
    calls = []
    for name in ("int4_gemm", "int4_amx_gemm", "int4_matmul", "int4_int8_gemm", "int4_tiles_matmul"):
        real = getattr(int8_kernel, name)
        monkeypatch.setattr(int8_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(int8_kernel, "DEQUANTIZE_BLOCK_ROWS", 64)  # 192 rows: three blocks of one tile
    lin = Int4Linear(256, 192, bias=False, dtype=torch.float32, group=64)
    lin.load_weight_rows(0, 192, torch.randn(192, 256))
    x = torch.randn(rows, 256)
    want = x.double() @ lin.dequantized().double().T
    assert (lin(x).double() - want).abs().max() <= 2e-2 * want.abs().max()
    if cpu == "amx" and rows >= int8_kernel.INT4_TILES_MIN_ROWS:
        assert calls == ["int4_tiles_matmul"]
    elif cpu.startswith("amx") and 6 <= rows <= 160:
        assert calls == ["int4_amx_gemm"]
    elif cpu == "no-amx" and rows >= 4:
        assert calls == ["int4_int8_gemm"]
    else:
        assert calls == ["int4_gemm" if rows < int4_dequantize_min_rows() else "int4_matmul"]


@pytest.mark.parametrize("rows", [3, 4, 200])
def test_without_vbmi_int4_batches_take_int4_int8s_vnni_build(rows, monkeypatch):
    """On an AVX-512 VNNI CPU without VBMI or AMX (Cascade Lake) int4_int8.c's VBMI build does not load: its VNNI
    build takes the int4 products of INT4_INT8_MIN_ROWS rows and more (fewer stay in int4_gemm), and the runner's
    line names it."""
    if not int8_kernel.available() or int8_kernel.int4_int8_library("vnni") is None:
        pytest.skip("no AVX-512 VNNI here (or no C compiler)")
    real = int8_kernel.int4_int8_library
    monkeypatch.setattr(int8_kernel, "_amx_library", lambda: None)
    monkeypatch.setattr(int8_kernel, "int4_int8_library", lambda isa="vbmi": None if isa == "vbmi" else real(isa))
    assert int8_kernel._int4_int8_kernel() is real("vnni")
    assert int8_kernel.kernels() == "int8_gemm.c (AVX-512 VNNI) and int4_int8.c (VNNI)"
    calls = []
    for name in ("int4_gemm", "int4_int8_gemm"):
        real_fn = getattr(int8_kernel, name)
        monkeypatch.setattr(int8_kernel, name, lambda *a, f=real_fn, name=name: calls.append(name) or f(*a))
    lin = avx2_int4_linear(256, 192, 64, seed=rows)
    x = torch.randn(rows, 256)
    want = x.double() @ lin.dequantized().double().T
    got = lin(x)
    assert calls == ["int4_gemm" if rows < 4 else "int4_int8_gemm"]
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_int4_blocks_start_later_where_onednn_has_no_amx_bf16_tiles(monkeypatch):
    """oneDNN's bf16 products of the dequantized blocks run on AMX-BF16 tiles where the CPU has them, and
    overtake int4_gemm from 56 rows; in AVX-512 BF16 alone only from 160 (BENCHMARKS.md)."""
    for flags, rows in ((("amx_bf16",), quant.INT4_DEQUANTIZE_MIN_ROWS), ((), quant.INT4_DEQUANTIZE_MIN_ROWS_NO_AMX)):
        monkeypatch.setattr(int8_kernel, "cpu_has", lambda wanted, flags=flags: set(wanted) <= set(flags))
        int4_dequantize_min_rows.cache_clear()
        try:
            assert int4_dequantize_min_rows() == rows
        finally:
            int4_dequantize_min_rows.cache_clear()


def test_int4_amx_kernel_is_built_where_the_cpu_has_amx_int8_and_vbmi():
    amx_cpu = int8_kernel.cpu_has(("amx_tile", "amx_int8", "avx512vbmi"))
    assert (int8_kernel._amx_library() is not None) == (int8_kernel.available() and amx_cpu)
    assert int8_kernel.INT4_AMX_ROWS == range(6, 161)


@pytest.mark.parametrize("rows", [1, 2, 6, 17, 55, 100, int8_kernel.INT4_AMX_MAX_ROWS])
@pytest.mark.parametrize("shape", [(256, 64), (4096, 128), (13696, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_amx_kernel_gives_the_vnni_kernels_product(shape, rows):
    """The tiles sum the same integers as int4_gemm (the int16 activations' two bytes apart) and scale them in
    the same order: the same numbers, bit for bit, and within 1e-4 of the float64 product over the weights
    (computed where reading them back is quick: dequantized() multiplies an identity of K rows)."""
    if int8_kernel._amx_library() is None:
        pytest.skip("no AMX-INT8 here (or no VNNI kernel): int4 batches take the other paths")
    k, n = shape
    lin = Int4Linear(k, n, bias=False, dtype=torch.float32)
    g = torch.Generator().manual_seed(k + n + rows)
    w = torch.randn(n, k, generator=g)
    w[0] = torch.where(torch.arange(k) % 2 == 0, -1.0, 1.0) * 3  # q at both ends, 0 and 15
    lin.load_weight_rows(0, n, w)
    assert lin.tiled and lin.group == 64
    x = torch.randn(rows, k, generator=g)
    x[:, :2] = -x.abs().max()  # the largest activations, negative: the high bytes' sign
    got = int8_kernel.int4_amx_gemm(x, lin.packed, lin.scales_and_zeros, lin.group)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.equal(got, int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group))
    if k <= 4096:
        want = x.double() @ lin.dequantized().double().T
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("rows", [int8_kernel.INT4_TILES_MIN_ROWS, 97, 200])
@pytest.mark.parametrize("shape", [(96, 64, 32), (256, 192, 64), (4160, 128, 64), (13696, 64, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_int4_tiles_kernel_is_the_bf16_product_of_the_dequantized_weights(shape, rows):
    """int4_tiles_gemm: the weight dequantized as dequantize_int4_bf16 has it (int4_matmul's blocks), times the bf16
    activations, summed in fp32 and rounded once: each output the float64 product's bf16 (or, at a rounding boundary
    the fp32 sums' order decides, its neighbour), the same for any number of threads. More than 4,096 inputs come in
    chunks of whole groups, the sums kept between them (4,160: two chunks; glm-4-9b's 13,696: four)."""
    if not int8_kernel.tiles_available():
        pytest.skip("no AMX-BF16 here (or no AMX-INT8 kernel): int4 prefill products take the bf16 blocks")
    k, n, group = shape
    lin = Int4Linear(k, n, bias=False, dtype=torch.bfloat16, group=group)
    g = torch.Generator().manual_seed(k + n + rows)
    w = torch.randn(n, k, generator=g)
    w[0] = torch.where(torch.arange(k) % 2 == 0, -1.0, 1.0) * 3  # q at both ends, 0 and 15
    lin.load_weight_rows(0, n, w)
    assert lin.tiled and lin.group == group
    assert int8_kernel.int4_tiles_fit(rows, n, k, group)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    weights = torch.empty(k, n, dtype=torch.bfloat16)  # dequantize_int4_bf16's own numbers, [K, N]
    int8_kernel._library().dequantize_int4_bf16(lin.packed.data_ptr(), lin.scales_and_zeros.data_ptr(), n, k, group,
                                                0, n, weights.data_ptr(), 1)
    truth = x.double() @ weights.double()
    assert_tiles_product(lambda: int8_kernel.int4_tiles_matmul(x, lin.packed, lin.scales_and_zeros, group), truth)
    if k <= 4096:  # and the weights are the layer's own, within bf16's rounding of them
        assert (weights.double().T - lin.dequantized().double()).abs().max() <= 2**-8 * w.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 6, int4_dequantize_min_rows() - 1])
@pytest.mark.parametrize("shape", [(96, 64), (256, 192), (4096, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_kernel_is_the_exact_product_but_for_int16_activations(shape, rows, monkeypatch):
    """Up to int4_dequantize_min_rows() - 1 rows through int8_gemm.c's int4_gemm (groups of 32 and 64 inputs; rows
    4 at a time and the rest): within 1e-4 of the float64 product over the dequantized weights, read back through
    torch's kernel from the scales kept tile by tile (torch's kernel, bf16 activations, lands ~2e-3 away)."""
    if not int8_kernel.available():
        pytest.skip("no AVX-512 VNNI or no C compiler here: Int4Linear uses torch's kernel")
    calls = []
    real = int8_kernel.int4_gemm
    monkeypatch.setattr(int8_kernel, "int4_gemm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(int8_kernel, "_amx_library", lambda: None)  # rows from 6 on would take the tiles
    monkeypatch.setattr(int8_kernel, "_int4_int8_kernel", lambda: None)  # and from 4, int8 activations
    k, n = shape
    lin = Int4Linear(k, n, bias=False, dtype=torch.float32)
    w = torch.randn(n, k)
    lin.load_weight_rows(0, n // 3, w[: n // 3])  # in two parts cutting a tile, as q and k/v come
    lin.load_weight_rows(n // 3, n, w[n // 3 :])
    assert lin.tiled and lin.scales_and_zeros.shape == (n // 64, k // lin.group, 64, 2)
    x = torch.randn(rows, k)
    x[:, :2] = -x.abs().max()  # the largest activations, negative: the int16 pairs' sign bits
    dequantized = lin.dequantized()
    assert_int4_fits(lin, w, "weight")
    want = x.double() @ dequantized.double().T
    got = lin(x)
    assert calls == [1] and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@functools.cache
def int4_linear_and_its_weights(k: int, n: int, group: int) -> tuple[Int4Linear, torch.Tensor | None]:
    """An Int4Linear (avx2_int4_linear's) and its weights dequantized in float64, where reading them back is
    quick (dequantized() multiplies an identity of K rows)."""
    lin = avx2_int4_linear(k, n, group, seed=k + n)
    return lin, lin.dequantized().double() if k <= 4096 else None


@pytest.mark.parametrize("isa", list(int8_kernel.INT4_INT8_BUILDS))
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64])
@pytest.mark.parametrize("shape", [(96, 64, 32), (256, 192, 64), (4096, 128, 64), (13696, 64, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_int4_int8_kernel_is_the_exact_product_of_activations_made_int8_per_group(shape, rows, isa):
    """int4_int8_gemm, in each of int4_int8.c's builds: each row's inputs rounded to int8 in groups of the weights'
    group (x / xs to nearest, xs = max|x| / 127; a group of zeros stays zero), then the exact product over the
    weights: within fp32 rounding (2e-6) of that product in float64, and each row's result the same, bit for bit,
    alone or in a batch."""
    lib = int8_kernel.int4_int8_library(isa)
    if lib is None or not int8_kernel.kernels_available():
        pytest.skip(f"int4_int8.c's {isa} build does not run here (or no C compiler)")
    k, n, group = shape
    lin, weights = int4_linear_and_its_weights(k, n, group)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[0, :group] = 0  # a group of zeros
    x[-1, -2:] = -x[-1].abs().max()  # the largest activations, negative
    got = int8_kernel.int4_int8_gemm(x, lin.packed, lin.scales_and_zeros, lin.group, lib)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    for i in {0, rows // 2, rows - 1}:
        assert torch.equal(got[i], int8_kernel.int4_int8_gemm(x[i : i + 1], lin.packed, lin.scales_and_zeros,
                                                              lin.group, lib)[0])
    exact = int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group).double()  # within 1e-4
    assert (got.double() - exact).abs().max() <= 2e-2 * exact.abs().max()  # int8's own rounding, ~6e-3 seen
    if weights is None:
        return
    groups = x.view(rows, k // group, group)
    top = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, 0.0)  # not 127 / top: torch takes 1 / top * 127
    xq = (groups * inv).round()  # half to even, as the kernel's conversion
    assert xq.abs().max() <= 127
    want = (xq.double() * (top.double() / 127)).view(rows, k) @ weights.T
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


def avx2_int4_linear(k: int, n: int, group: int, seed: int) -> Int4Linear:
    lin = Int4Linear(k, n, bias=False, dtype=torch.float32, group=group)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = torch.where(torch.arange(k) % 2 == 0, -1.0, 1.0) * 3  # q at both ends, 0 and 15
    lin.load_weight_rows(0, n, w)
    assert lin.tiled and lin.group == group
    return lin


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 17, 64, 200])
@pytest.mark.parametrize("shape", [(96, 64, 32), (256, 192, 64), (4096, 128, 64), (13696, 64, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_int4_avx2_kernel_gives_the_vnni_kernels_product(shape, rows):
    """quant_avx2.c (CPUs without AVX-512) sums the same integers as int8_gemm.c's int4_gemm and scales them in
    the same order: the same numbers, bit for bit (up to 3 rows unpack as they go, more through the group's buffer)."""
    if not int8_kernel.available() or int8_kernel.avx2_library() is None:
        pytest.skip("needs both kernels built: AVX-512 VNNI, AVX2 and a C compiler")
    k, n, group = shape
    lin = avx2_int4_linear(k, n, group, seed=k + n + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[:, :2] = -x.abs().max()  # the largest activations, negative: the int16 pairs' sign bits
    got = int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group, int8_kernel.avx2_library())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.equal(got, int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group))


def avx2_library_or_skip():
    """quant_avx2.c's library, or the test skipped where it does not build (no AVX2 and FMA, or no C compiler)."""
    lib = int8_kernel.avx2_library()
    if lib is None:
        pytest.skip("no AVX2 and FMA here, or no C compiler")
    return lib


@pytest.mark.parametrize("rows", [2, 3, 4, 5])
def test_int4_avx2_rows_together_give_each_rows_product_alone(rows):
    """quant_avx2.c's int4_gemm sums rows in pairs (2-3 rows) or from the group's buffer (4 and more), and one row
    alone: the same integers scaled in the same order, so each row's product is the one it gets alone, bit for
    bit (on any CPU with AVX2, where test_int4_avx2_kernel_gives_the_vnni_kernels_product needs AVX-512 too)."""
    lib = avx2_library_or_skip()
    for k, n, group in [(256, 192, 64), (4096, 128, 64), (96, 64, 32)]:
        lin = avx2_int4_linear(k, n, group, seed=k + rows)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x[:, :2] = -x.abs().max()
        together = int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group, lib)
        for m in range(rows):
            alone = int8_kernel.int4_gemm(x[m : m + 1], lin.packed, lin.scales_and_zeros, lin.group, lib)
            assert torch.equal(together[m : m + 1], alone), (k, n, m)


def only_the_avx2_kernels(monkeypatch, *names: str) -> list[str]:
    """int8_kernel as on a CPU without AVX-512 VNNI (int8_gemm.c's library None, and so no AMX kernel: on an AMX CPU
    its cached library would otherwise still take batches; quant_avx2.c's built); its functions `names` record their
    calls in the list returned."""
    avx2_library_or_skip()
    monkeypatch.setattr(int8_kernel, "_library", lambda: None)
    monkeypatch.setattr(int8_kernel, "_amx_library", lambda: None)
    assert int8_kernel.kernels_available() and not int8_kernel.available()
    calls = []
    for name in names:
        real = getattr(int8_kernel, name)
        monkeypatch.setattr(int8_kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 160, 300])
def test_without_avx512_every_int4_row_count_takes_the_avx2_kernels(rows, monkeypatch):
    """Where only quant_avx2.c builds (no AVX-512 VNNI: int8_gemm.c's library is None), Int4Linear keeps the tiled
    layout and runs every row count in it (no bf16 blocks, no AMX) through int4_int8.c's AVX2 build (int8
    activations), one row too (not from 4, as beside int8_gemm.c): within 2e-2 of the float64 product. Without
    that build, quant_avx2.c's int4_gemm (int16 activations) takes them, within 1e-4."""
    calls = only_the_avx2_kernels(monkeypatch, "int4_gemm", "int4_amx_gemm", "int4_matmul", "int4_int8_gemm")
    assert int8_kernel._int4_int8_kernel() is int8_kernel.int4_int8_library("avx2") is not None
    assert int8_kernel.int4_int8_min_rows() == 1
    lin = avx2_int4_linear(256, 192, 64, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))  # not the global stream: 1e-4 is tight
    want = x.double() @ lin.dequantized().double().T
    for kernel, error in (("int4_int8_gemm", 2e-2), ("int4_gemm", 1e-4)):
        calls.clear()
        got = lin(x)
        assert calls == [kernel] and got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= error * want.abs().max()
        monkeypatch.setattr(int8_kernel, "_int4_int8_kernel", lambda: None)


def test_int4_tiles_hold_rows_d_and_d_plus_32_in_one_byte_on_any_cpu():
    """pack_int4_tile: byte d of input k's 32 holds rows d (low nibble) and d + 32, byte 16 + d rows d + 16 and
    d + 48; unpack_int4_tiles takes every tile back."""
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([quant.pack_int4_tile(q[:64]), quant.pack_int4_tile(q[64:])])
    assert packed.dtype == torch.uint8 and packed.shape == (128, 48)
    by_input = packed.view(2, 96, 32).int()  # [tile, K, 32 bytes]
    for tile, k, d in [(0, 0, 0), (0, 5, 7), (0, 95, 15), (1, 40, 3)]:
        rows = q[64 * tile :, k]
        assert by_input[tile, k, d] == rows[d] | rows[d + 32] << 4
        assert by_input[tile, k, 16 + d] == rows[d + 16] | rows[d + 48] << 4
    assert torch.equal(quant.unpack_int4_tiles(packed), q.to(torch.uint8))


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="torch packs this layout where it runs its AVX-512 kernels")
def test_int4_tiles_are_the_layout_torch_packs_on_an_avx512_cpu():
    q = torch.randint(0, 16, (64, 256), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert torch.equal(quant.pack_int4_tile(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))


AVX2_INT4_PROBE = """
import sys, torch
from glm4serve.model import int8_kernel
from glm4serve.model.quant import Int4Linear
if not int8_kernel.kernels_available():
    print("SKIP no AVX2 kernels here (no AVX2 and FMA, or no C compiler)"); sys.exit()
assert torch.backends.cpu.get_cpu_capability() == "AVX2"  # where torch packs int4 in tiles of 32 rows
lin = Int4Linear(256, 192, bias=False, dtype=torch.float32)
w = torch.randn(192, 256, generator=torch.Generator().manual_seed(0))
lin.load_weight_rows(0, 192, w)
assert lin.tiled
groups = w.view(192, 4, 64)
low, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
spread = (((groups - low) / step).round().clamp(0, 15) * step + low).view(192, 256)  # levels over each range
print("WEIGHTS", (((lin.dequantized() - w) ** 2).sum() / ((spread - w) ** 2).sum()).item())  # fitted: below 1
for rows in (1, 8):  # int4_int8.c's AVX2 build (one row read in place, 8 through its buffer); int4_gemm
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ lin.dequantized().double().T
    print("ROWS", rows, ((lin(x).double() - want).abs().max() / want.abs().max()).item())
    got = int8_kernel.int4_gemm(x, lin.packed, lin.scales_and_zeros, lin.group)
    print("INT16", rows, ((got.double() - want).abs().max() / want.abs().max()).item())
"""


def test_int4_kernels_read_the_tiles_where_torch_would_pack_them_otherwise():
    """On a CPU with AVX2 and not AVX-512, torch packs int4 weights in tiles of 32 rows, not 64; our kernels read
    64-row tiles, so Int4Linear packs them itself (pack_int4_tile). Here torch is held to AVX2
    (ATEN_CPU_CAPABILITY) and our kernels too: the weights come back as fitted, and the products of 1 and
    8 rows match them: within 2e-2 of the largest output as served (int8 activations), 1e-4 through int4_gemm
    (int16 activations)."""
    env = dict(os.environ, GLM4SERVE_MAX_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", AVX2_INT4_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout[5:].strip())
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [float(line[1]) < 1 for line in lines if line[0] == "WEIGHTS"] == [True], out.stdout
    for kind, error in (("ROWS", 2e-2), ("INT16", 1e-4)):
        errors = {int(line[1]): float(line[2]) for line in lines if line[0] == kind}
        assert errors.keys() == {1, 8} and max(errors.values()) <= error, out.stdout


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64, 200])
@pytest.mark.parametrize("shape", [(96, 64, 32), (256, 192, 64), (4096, 128, 64), (13696, 64, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_int4_int8_kernels_other_builds_give_the_vbmi_builds_numbers(shape, rows, isa):
    """int4_int8.c built without VBMI (its weights unpacked by bytes and words) or for AVX2 (vpmaddubsw, int16 then
    int32 sums) sums the same integers as its VBMI build (vpermt2b, vpdpbusd) and scales them in the same fused
    steps: the same numbers, bit for bit."""
    if int8_kernel.int4_int8_library("vbmi") is None or int8_kernel.int4_int8_library(isa) is None:
        pytest.skip(f"needs both builds: AVX-512 VNNI and VBMI, {isa}, and a C compiler")
    lin, _ = int4_linear_and_its_weights(*shape)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, shape[0], generator=g) * 3
    x[0, : shape[2]] = 0
    x[-1, -2:] = -x[-1].abs().max()
    args = (x, lin.packed, lin.scales_and_zeros, lin.group)
    got = int8_kernel.int4_int8_gemm(*args, int8_kernel.int4_int8_library(isa))
    assert torch.equal(got, int8_kernel.int4_int8_gemm(*args, int8_kernel.int4_int8_library("vbmi")))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 33, 77, 130])
@pytest.mark.parametrize("shape", [*KERNEL_SHAPES, (64, 13696), (70, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_avx2_kernel_gives_the_vnni_kernels_product(shape, rows):
    """quant_avx2.c's int8_int16_gemm sums the same integers as int8_gemm.c's in the same lanes, moves them to fp32
    after the same inputs and adds those across in the same order: the same numbers, bit for bit (inputs not a
    multiple of 32, outputs not of 4, FLUSH blocks cut short; with 13,696 inputs, passes of 75 rows, the last of 77
    rows' two taking the few-rows path)."""
    if not int8_kernel.available() or int8_kernel.avx2_library() is None:
        pytest.skip("needs both kernels built: AVX-512 VNNI, AVX2 and a C compiler")
    n, k = shape
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[:, :2] = -127  # with the largest activations, negative below: the int16 products' sign bits
    scale = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g)
    x[:, :2] = -x.abs().max()
    got = int8_kernel.int8_matmul(x, q, scale, int8_kernel.avx2_library())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.equal(got, int8_kernel.int8_matmul(x, q, scale))


@pytest.mark.parametrize("rows", [1, 4, DEQUANTIZE_MIN_ROWS, 300])
def test_without_avx512_every_int8_row_count_takes_the_avx2_kernel(rows, monkeypatch):
    """Where only quant_avx2.c builds, Int8Linear runs every row count in its int8_int16_gemm (no bf16 blocks,
    which oneDNN cannot multiply there, no AMX): within 1e-4 of the float64 product."""
    calls = only_the_avx2_kernels(monkeypatch, "int8_matmul", "int8_amx_matmul", "blockwise_matmul")
    lin = Int8Linear(160, 70, bias=False, dtype=torch.float32)
    lin.load_weight_rows(0, 70, torch.randn(70, 160))
    x = torch.randn(rows, 160)
    want = x.double() @ lin.dequantized().double().T
    got = lin(x)
    assert calls == ["int8_matmul"] and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_max_cpu_isa_avx2_hides_avx512_and_amx(monkeypatch):
    """GLM4SERVE_MAX_CPU_ISA=avx2 gives the kernels of a CPU without AVX-512 on one with it."""
    monkeypatch.setattr(int8_kernel.Path, "read_text",
                        lambda self: "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_vnni amx_tile amx_int8\n")
    assert int8_kernel.cpu_has(("avx2", "fma")) and int8_kernel.cpu_has(("avx512f", "avx512_vnni"))
    monkeypatch.setenv("GLM4SERVE_MAX_CPU_ISA", "avx2")
    assert int8_kernel.cpu_has(("avx2", "fma"))
    assert not int8_kernel.cpu_has(("avx512f",)) and not int8_kernel.cpu_has(("amx_tile",))


def test_int4_scales_stay_in_torch_layout_where_its_kernel_runs():
    """Rows not a whole number of tiles: torch's kernel, its scales layout."""
    lin = Int4Linear(64, 96, bias=False, dtype=torch.float32)
    w = torch.randn(96, 64)
    lin.load_weight_rows(0, 96, w)
    assert not lin.tiled and lin.scales_and_zeros.shape == (1, 96, 2)
    x = torch.randn(3, 64)
    want = x.double() @ lin.dequantized().double().T
    assert (lin(x).double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_int8_linear_keeps_the_input_shape_and_dtype():
    lin = Int8Linear(96, 37, bias=True, dtype=torch.bfloat16)
    lin.load_weight_rows(0, 37, torch.randn(37, 96))
    lin.bias.data.normal_()
    x = torch.randn(2, 5, 96).to(torch.bfloat16)
    y = lin(x)
    assert y.shape == (2, 5, 37) and y.dtype == torch.bfloat16
    want = (x.float() @ lin.dequantized().T + lin.bias.float())
    assert (y.float() - want).abs().max() <= 0.02 * want.abs().max()


class BF16InputLinear(nn.Linear):
    """Plain PyTorch over a quantized linear's dequantized weight, in fp32 between the bf16 input and
    output that torch's quantized kernels take and give."""

    def forward(self, x):
        y = super().forward(x.to(torch.bfloat16).float())
        return (y if self.bias is None else y - self.bias).to(torch.bfloat16).to(x.dtype) + (
            0 if self.bias is None else self.bias)


def kernel_reference(scheme):
    """The plain linear that computes what the scheme's kernel does: int8_kernel's int8 products take
    and give the model's dtype (its int16 activations are ~3e-5 from exact); torch's take bf16."""
    return nn.Linear if scheme == "int8" and int8_kernel.kernels_available() else BF16InputLinear


def dequantized_model(path, scheme):
    """The model with every quantized linear replaced by plain nn.Linear over its dequantized weight."""
    model = load_model(path, dtype=torch.float32, quantization=scheme)
    for name, q in quantized_linears(model).items():
        parent, _, attr = name.rpartition(".")
        plain = kernel_reference(scheme)(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(q.dequantized())
            if q.bias is not None:
                plain.bias.copy_(q.bias)
        setattr(model.get_submodule(parent) if parent else model, attr, plain)
    return model


def logits_along(runner, prompt, tokens, block_size=4):
    """The runner's logits at each of len(tokens) steps, fed `tokens` (another runner's picks) rather than its own."""
    pool = BlockPool(runner.num_blocks, block_size)
    table, start, nxt, out = [], 0, prompt, []
    for token in tokens:
        table += pool.allocate(pool.blocks_needed(start + len(nxt)) - len(table))
        out.append(runner.execute(ScheduledBatch([SeqChunk(nxt, start, list(table))]))[0])
        start += len(nxt)
        nxt = [token]
    return out


@pytest.mark.parametrize("scheme", [*SCHEMES, "int8-avx2", "int4-avx2"])
def test_engine_greedy_tokens_agree_with_plain_pytorch_over_the_dequantized_weights(make_checkpoint, scheme,
                                                                                   monkeypatch):
    if scheme.endswith("-avx2"):  # the kernels of a CPU without AVX-512
        avx2_library_or_skip()
        monkeypatch.setattr(int8_kernel, "_library", lambda: None)
        assert int8_kernel.kernels() == "quant_avx2.c (AVX2) and int4_int8.c (AVX2)"
        scheme = scheme.removesuffix("-avx2")
    path = make_checkpoint("glm4", "hf", "wide")
    engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", quantization=scheme, num_kv_blocks=64,
                                         block_size=4))
    assert isinstance(engine.runner, CpuRunner)
    linears = quantized_linears(engine.runner.model).values()
    weights = [m.qweight if isinstance(m, Int8Linear) else m.packed for m in linears]
    assert linears and all(w.data_ptr() % (2 << 20) == 0 for w in weights)  # moved to huge-page memory
    if scheme == "int4":
        assert any(m.tiled for m in linears) == int8_kernel.kernels_available()  # our kernels run where they build
    assert f"{type(next(iter(linears))).__name__} in {int8_kernel.kernels()}" in repr(engine.runner)
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    engine.add_request("q", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    got = []
    while engine.has_work:
        got += [t for o in engine.step() for t in o.token_ids]
    reference = EagerRunner(dequantized_model(path, scheme), 64, 4, vocab_limit=engine.tokenizer.vocab_size)
    # each pick the reference's top token along the same tokens, or a near tie: int4 on AVX2 decodes with int8
    # activations (one pick seen 0.004 below the top of a 1.4 range, where the reference rounds to bf16)
    gaps = [float((logits.max() - logits[token]) / (logits.max() - logits.min()))
            for token, logits in zip(got, logits_along(reference, prompt, got), strict=True)]
    assert len(gaps) == 16 and max(gaps) <= 0.01 and sum(gap > 0 for gap in gaps) <= 2, gaps


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
    # the load's temporaries: up to four chunk-sized ones (fp32 rows, their int32 codes, a partial int4 tile,
    # the packing's output), and the reader's and allocator's own (measured: int4 up to ~20 MiB past the rest)
    slack = 4 * 4 * quant.LOAD_CHUNK_ELEMENTS + (8 << 20)
    assert m["grew"] <= m["weights"] + m["largest_tensor"] + slack, m
