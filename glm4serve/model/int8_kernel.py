"""The int8 x int16 matrix product of int8_gemm.c, built on first use with the system C compiler.

`_weight_int8pack_mm` (PyTorch's int8 kernel) widens every weight to float and multiplies in
float: ~30-36 G weights/s on the project's 2 cores, below the memory's read rate, and it takes
bf16 activations (8 bits). int8_gemm.c quantizes each activation row to int16 (15 bits) and
multiplies integers with AVX-512 VNNI: one row reads the weights at the memory's rate (1.1-1.3x),
and the product is ~100x closer to exact. From DEQUANTIZE_MIN_ROWS rows on (prefill chunks, big
decode batches) blocks of the weight are dequantized to bf16 and multiplied by oneDNN, whose bf16
matrix units (AMX) outrun the integer dot products there: 1.5-2x at 32 rows, 8-10x at 512
(BENCHMARKS.md).

Built as inductor builds its kernels: `cc -O3 -fopenmp` into a cache folder, keyed by the source
and flags, loaded with ctypes; its OpenMP calls go to the runtime torch has already loaded (the
same libgomp soname), so both share one team of threads. Without AVX-512 VNNI, a compiler, or
on a build error (logged), `available()` is False and Int8Linear uses `_weight_int8pack_mm`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
DEQUANTIZE_MIN_ROWS = 32  # from this many activation rows, dequantize + bf16 product (BENCHMARKS.md)
DEQUANTIZE_BLOCK_ROWS = 2048  # weight rows dequantized at a time (measured: 512 / 2048 / 8192)


def _cpu_has_vnni() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in CPU_FLAGS)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "glm4serve" / "kernels"


def _compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _build(compiler: str) -> Path:
    """The shared library, compiled once per source and flags (atomically: ranks may race)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"int8_gemm-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not _cpu_has_vnni():
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler: int8 linears use torch's _weight_int8pack_mm")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("int8 kernel not built (%s): int8 linears use torch's _weight_int8pack_mm",
                    getattr(e, "stderr", None) or e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.quantize_rows_int16.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.int8_int16_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.dequantize_bf16.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.dequantize_int4_bf16.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def dequantize_bf16(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight int8 [N, K] * scale bf16 [N, 1] -> bf16 [N, K] (rounded to nearest even), into `out`."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=torch.bfloat16) if out is None else out
    _library().dequantize_bf16(weight.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight int8 [N, K] * scale bf16 [N, 1]).T: fp32 [M, N] through the integer kernel below
    DEQUANTIZE_MIN_ROWS rows, else bf16 [M, N] with the weight dequantized a block at a time."""
    if x.shape[0] < DEQUANTIZE_MIN_ROWS:
        return int8_matmul(x, weight, scale)
    return blockwise_matmul(x, weight.shape[0],
                            lambda r0, r1, block: dequantize_bf16(weight[r0:r1], scale[r0:r1], block.view(r1 - r0, -1)))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ the int4 weight in torch's CPU packed layout (quant.py's Int4Linear) .T -> bf16 [M, N],
    the weight dequantized a block at a time (transposed: that layout runs along the rows)."""
    n, k = scales_and_zeros.shape[1], x.shape[1]

    def dequantize(r0: int, r1: int, block: torch.Tensor) -> torch.Tensor:
        w_t = block.view(k, r1 - r0)  # [K, rows]
        _library().dequantize_int4_bf16(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, group, r0, r1 - r0,
                                        w_t.data_ptr(), torch.get_num_threads())
        return w_t.t()  # [rows, K], a view

    return blockwise_matmul(x, n, dequantize)


def blockwise_matmul(x: torch.Tensor, n: int, dequantize) -> torch.Tensor:
    """x [M, K] @ W.T -> bf16 [M, N], W's rows DEQUANTIZE_BLOCK_ROWS at a time made bf16 by
    `dequantize(r0, r1, buffer) -> [r1 - r0, K]` and multiplied by oneDNN (AMX where the CPU has it):
    each block stays in cache between the two, and the buffer is small (56 MiB for glm-4-9b's down
    projection)."""
    m, k = x.shape
    x = x.to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    buffer = torch.empty(min(n, DEQUANTIZE_BLOCK_ROWS) * k, dtype=torch.bfloat16)
    for r0 in range(0, n, DEQUANTIZE_BLOCK_ROWS):
        r1 = min(n, r0 + DEQUANTIZE_BLOCK_ROWS)
        y[:, r0:r1] = F.linear(x, dequantize(r0, r1, buffer[: (r1 - r0) * k]))
    return y


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ (weight int8 [N, K] * scale bf16 [N, 1]).T -> [M, N] fp32."""
    lib = _library()
    m, k = x.shape
    n = weight.shape[0]
    x = x.to(torch.float32).contiguous()
    xq = torch.empty(m, k, dtype=torch.int16)
    xs = torch.empty(m, dtype=torch.float32)
    y = torch.empty(m, n, dtype=torch.float32)
    threads = torch.get_num_threads()
    lib.quantize_rows_int16(x.data_ptr(), m, k, xq.data_ptr(), xs.data_ptr(), threads)
    lib.int8_int16_gemm(weight.data_ptr(), scale.data_ptr(), n, k, xq.data_ptr(), xs.data_ptr(), m, y.data_ptr(),
                        threads)
    return y
