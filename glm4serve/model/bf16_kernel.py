"""bf16 products of one to four rows (decode) in bf16_gemm.c, built on first use like the int8
kernels (int8_kernel.py: the system C compiler, a cache folder, ctypes, torch's OpenMP runtime).

oneDNN, which multiplies the other bf16 products, reads a bf16 weight for a single row at 7-11 GB/s
on the project's 2-core box, where this kernel reads 16-24 GB/s; from 8 rows oneDNN is faster
(BENCHMARKS.md, "bf16 decode in our own kernel"). Without AVX-512 BF16, a C compiler, or on a build
error (logged), `available()` is False and every bf16 product is oneDNN's.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .int8_kernel import load_library

SOURCE = Path(__file__).with_name("bf16_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # the ISA is the source's target attribute
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
MAX_ROWS = 4  # most activation rows it takes (module docstring)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, CPU_FLAGS, "bf16 products use oneDNN")
    if lib is not None:
        lib.bf16_gemm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def fits(weight: torch.Tensor) -> bool:
    """A weight the kernel reads: bf16, contiguous, inputs a multiple of 32 (every GLM-4's are)."""
    return weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape[1] % 32 == 0


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x bf16 [M, K] (M <= MAX_ROWS) @ weight bf16 [N, K].T (+ bias bf16 [N]) -> bf16 [M, N]."""
    x = x.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    _library().bf16_gemm(weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(), n, k,
                         x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())
    return y
