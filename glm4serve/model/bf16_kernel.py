"""bf16 products of decode batches (1 to AMX_MAX_ROWS rows) in bf16_gemm.c, built on first use like the int8
kernels (int8_kernel.py: the system C compiler, a cache folder, ctypes, torch's OpenMP runtime).

oneDNN, which multiplies the other bf16 products, reads a bf16 weight for a few rows at ~2/3 of the
memory's rate on the project's 2-core box, where this file's kernels read at about the memory's rate: 1 to
VECTOR_ROWS rows in vector instructions (AVX-512 BF16), then, where the CPU has AMX-BF16 and the weight's rows
are a multiple of 32, up to AMX_MAX_ROWS rows on AMX tiles, which read the weight once for every 32 rows
(1.1-1.3x oneDNN at 5-128 rows, 0.8x from 192: BENCHMARKS.md). Otherwise the vector kernel stops at
VECTOR_ROWS (from 8 rows oneDNN is faster). Without AVX-512 BF16, a C compiler, or on a build error (logged),
`available()` is False and every bf16 product is oneDNN's.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from .int8_kernel import cpu_has, load_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # the ISA is each function's target attribute
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")
VECTOR_ROWS = 4  # most activation rows the vector kernel takes (module docstring)
AMX_MAX_ROWS = 128  # and the AMX one (module docstring)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, CPU_FLAGS, "bf16 products use oneDNN")
    if lib is not None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.bf16_gemm.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        if hasattr(lib, "bf16_amx_gemm"):  # not built by a compiler without the AMX targets (bf16_gemm.c)
            lib.bf16_amx_gemm.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
            lib.pack_bf16_activations.argtypes = [ptr, i64, i64, ptr]
    return lib


def available() -> bool:
    return _library() is not None


@functools.cache
def amx_available() -> bool:
    """The AMX kernel runs here: the library is built with it, the CPU has AMX-BF16 and Linux grants its tile
    state."""
    if not available() or not hasattr(_library(), "bf16_amx_gemm") or not cpu_has(AMX_CPU_FLAGS):
        return False
    if _library().amx_request() != 0:
        log.warning("Linux refused the AMX tile state: bf16 batches of %d-%d rows use oneDNN", VECTOR_ROWS + 1,
                    AMX_MAX_ROWS)
        return False
    return True


def max_rows(weight: torch.Tensor) -> int:
    """The most rows a product with this weight [N, K] may have to run here (CpuLinear sends it those)."""
    return AMX_MAX_ROWS if _on_tiles(weight.shape[0]) else VECTOR_ROWS


def _on_tiles(n: int) -> bool:
    return n % 32 == 0 and amx_available()  # the tiles take the weight's rows 32 at a time


def fits(weight: torch.Tensor) -> bool:
    """A weight the kernels read: bf16, contiguous, inputs a multiple of 32 (every GLM-4's are)."""
    return weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape[1] % 32 == 0


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x bf16 [M, K] (M <= max_rows(weight)) @ weight bf16 [N, K].T (+ bias bf16 [N]) -> bf16 [M, N]: the fp32 sum
    rounded once to bf16. More than VECTOR_ROWS rows on the tiles, else in the vector kernel (every 4 rows reading
    the weight again)."""
    x = x.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    bias = None if bias is None else bias.contiguous()  # held while the kernel reads it
    bias_ptr = None if bias is None else bias.data_ptr()
    if m > VECTOR_ROWS and _on_tiles(n):
        packed = torch.empty((m + 15) // 16 * 16 * k // 2, dtype=torch.int32)  # pairs of inputs, 16 rows a group
        _library().pack_bf16_activations(x.data_ptr(), m, k, packed.data_ptr())
        _library().bf16_amx_gemm(weight.data_ptr(), bias_ptr, n, k, packed.data_ptr(), m, y.data_ptr(),
                                 torch.get_num_threads())
    else:
        _library().bf16_gemm(weight.data_ptr(), bias_ptr, n, k, x.data_ptr(), m, y.data_ptr(),
                             torch.get_num_threads())
    return y
