"""bf16 products of decode batches (1 to AMX_MAX_ROWS rows) in bf16_gemm.c, built on first use like the int8
kernels (int8_kernel.py: the system C compiler, a cache folder, ctypes, torch's OpenMP runtime).

oneDNN, which multiplies the other bf16 products, reads a bf16 weight for a few rows at ~2/3 of the
memory's rate on the project's 2-core boxes, where this file's kernels read at about the memory's rate: 1 to
VECTOR_ROWS rows in vector instructions (AVX-512 BF16), then, where the CPU has AMX-BF16 and the weight's rows
are a multiple of 32, up to AMX_MAX_ROWS rows on AMX tiles, which read the weight once for every 32 rows
(1.1-1.3x oneDNN at 5-128 rows, 0.8x from 192: BENCHMARKS.md). With AMX and a weight the tiles do not take,
oneDNN (on tiles too) from VECTOR_ROWS + 1. Without AMX the vector kernel takes up to VECTOR_ROWS_NO_AMX rows:
from memory, as a served model's weights are read, it led oneDNN's AVX-512 BF16 products 1.3-1.6x at 5-16 rows
and 1.3x at 32 on an AMD EPYC, level at 48-64. On a CPU with AVX2 and not AVX-512 BF16 (`avx2_available()`),
where oneDNN multiplies no bf16 at all (cpu_linear.py: torch's F.linear does, re-reading the weights for every
few rows), `bf16_gemm_avx2` takes every product, the weights widened to fp32 as they are read (one row
1.1-1.3x F.linear from memory with AVX-512 hidden on the AMD EPYC). Without a C compiler, or on a build error
(logged), neither is available.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path

import torch

from .int8_kernel import cpu_has, load_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # the ISA is each function's target attribute
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
AVX2_CPU_FLAGS = ("avx2", "fma")  # the library loads where the CPU has these; its AVX-512 kernels need CPU_FLAGS
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")
VECTOR_ROWS = 4  # most activation rows the vector kernel takes beside the AMX one (module docstring)
VECTOR_ROWS_NO_AMX = 48  # and where there is none
# and the AVX2 one: every row count (a layer's four products at glm-4-9b's shapes 2.4-3.4x torch's bf16 F.linear
# from 4 to 128 rows, and quicker than fp32 products over the weights widened first: BENCHMARKS.md)
AVX2_ROWS = sys.maxsize
AMX_MAX_ROWS = 128  # and the AMX one (module docstring)


@functools.cache
def _built() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, AVX2_CPU_FLAGS, "bf16 products use oneDNN (or F.linear)")
    if lib is not None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.bf16_gemm.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.bf16_gemm_avx2.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        if hasattr(lib, "bf16_amx_gemm"):  # not built by a compiler without the AMX targets (bf16_gemm.c)
            lib.bf16_amx_gemm.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
            lib.pack_bf16_activations.argtypes = [ptr, i64, i64, ptr]
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The library, where its AVX-512 BF16 kernels run here."""
    return _built() if cpu_has(CPU_FLAGS) else None


def available() -> bool:
    return _library() is not None


def avx2_available() -> bool:
    """bf16_gemm_avx2 runs here, and the AVX-512 BF16 kernels do not."""
    return not available() and _built() is not None


def kernel_rows(weight: torch.Tensor) -> int:
    """Products with this weight of up to this many rows run in this module's kernels (0: none here)."""
    if not fits(weight):
        return 0
    return max_rows(weight) if available() else AVX2_ROWS if avx2_available() else 0


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
    if _on_tiles(weight.shape[0]):
        return AMX_MAX_ROWS
    return VECTOR_ROWS if amx_available() else VECTOR_ROWS_NO_AMX


def _on_tiles(n: int) -> bool:
    return n % 32 == 0 and amx_available()  # the tiles take the weight's rows 32 at a time


def fits(weight: torch.Tensor) -> bool:
    """A weight the kernels read: bf16, contiguous, inputs a multiple of 32 (every GLM-4's are)."""
    return weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape[1] % 32 == 0


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x bf16 [M, K] (M <= kernel_rows(weight)) @ weight bf16 [N, K].T (+ bias bf16 [N]) -> bf16 [M, N]: the fp32 sum
    rounded once to bf16. More than VECTOR_ROWS rows on the tiles, else in the vector kernel (every 4 rows reading
    4 weight rows again, from L2); on a CPU with AVX2 alone in bf16_gemm_avx2."""
    m, (n, k) = x.shape[0], weight.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    bias = None if bias is None else bias.contiguous()  # held while the kernel reads it
    bias_ptr = None if bias is None else bias.data_ptr()
    threads = torch.get_num_threads()
    if not available():  # AVX2: the activations widened to fp32 here, once
        x32 = x.float().contiguous()
        _built().bf16_gemm_avx2(weight.data_ptr(), bias_ptr, n, k, x32.data_ptr(), m, y.data_ptr(), threads)
        return y
    x = x.contiguous()
    if m > VECTOR_ROWS and _on_tiles(n):
        packed = torch.empty((m + 15) // 16 * 16 * k // 2, dtype=torch.int32)  # pairs of inputs, 16 rows a group
        _library().pack_bf16_activations(x.data_ptr(), m, k, packed.data_ptr())
        _library().bf16_amx_gemm(weight.data_ptr(), bias_ptr, n, k, packed.data_ptr(), m, y.data_ptr(), threads)
    else:
        _library().bf16_gemm(weight.data_ptr(), bias_ptr, n, k, x.data_ptr(), m, y.data_ptr(), threads)
    return y
