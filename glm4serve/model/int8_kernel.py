"""The int8 x int16 matrix products of int8_gemm.c and int8_amx.c (and int4_int8.c's int4 x int8 ones), built on first
use with the system C compiler.

`_weight_int8pack_mm` (PyTorch's int8 kernel) widens every weight to float and multiplies in
float: ~30-36 G weights/s on the project's 2 cores, below the memory's read rate, and it takes
bf16 activations (8 bits). Ours quantize each activation row to int16 (15 bits) and multiply
integers, ~100x closer to exact, by the number of rows (BENCHMARKS.md):
- 1 row (one decoding stream): int8_gemm.c, AVX-512 VNNI, reads the weights at the memory's rate
  (1.1-1.3x torch's).
- 2 to AMX_MAX_ROWS - 1 rows (decode batches, short prefills), where the CPU has AMX-INT8:
  int8_amx.c on the tiles, 2-10x the paths it replaces at 8-64 rows, 1.3-2.6x at 128 (BENCHMARKS.md); where it has
  AMX-BF16 too, only up to TILES_MIN_ROWS - 1 (below).
- otherwise, from DEQUANTIZE_MIN_ROWS rows: blocks of the weight dequantized to bf16 and multiplied
  by oneDNN (on AMX-BF16 where present), 6-11x torch's at 512 rows; below it the VNNI kernel. Where the
  CPU has AMX-BF16, from TILES_MIN_ROWS rows dequantized_tiles.h's int8_tiles_gemm instead (the weight dequantized
  into bf16 tiles that stay in L2, not into memory; bf16 activations, as the blocks').
int4 weights (quant.py's Int4Linear: torch's packed layout, the scales tile by tile) take the same two ends:
up to quant.int4_dequantize_min_rows() - 1 rows through int8_gemm.c's int4_gemm (int16 activations, VNNI; one row
at the memory's rate), many rows through dequantized bf16 blocks; between, INT4_AMX_ROWS rows on AMX tiles
where the CPU has them (int8_amx.c's int4_amx_gemm, the same numbers as int4_gemm), and where it has AMX-BF16 too,
from INT4_TILES_MIN_ROWS rows the blocks' product with the weight dequantized into bf16 tiles in L2 instead
(int4_tiles_gemm); where it has no AMX, from
INT4_INT8_MIN_ROWS rows int4_int8.c's int4_int8_gemm (built with VBMI where the CPU has it, else without), the
activations int8 per group of inputs (as llama.cpp's Q8_0 activations): half int4_gemm's multiplies, which bind it
there from ~4 rows. On a CPU with AVX2 and
not AVX-512 VNNI (most desktop and laptop CPUs), quant_avx2.c's int8_int16_gemm (the same numbers again) takes
every int8 row count, and int4_int8.c built for AVX2 (the same numbers as its AVX-512 build; one row read from the
weights in place) every int4 one, quant_avx2.c's int4_gemm where that does not build: a 40-layer decode step
1.2x torch's int8 kernel there at one stream (both near the memory's rate), 1.7-1.9x at 8-16; 2-4x its int4
kernel; and quicker than fp32 blocks through MKL (BENCHMARKS.md).

Built as inductor builds its kernels: `cc -O3 -fopenmp` into a cache folder, keyed by the source
and flags, loaded with ctypes; its OpenMP calls go to the runtime torch has already loaded (the
same libgomp soname), so both share one team of threads. Without AVX-512 VNNI or AVX2, a compiler, or
on a build error (logged), `kernels_available()` is False and the linears use torch's kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); without AMX (or Linux's permission for its tile
state) the AMX range falls to the other paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
AMX_SOURCE = Path(__file__).with_name("int8_amx.c")
AMX_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw",
             "-mavx512vbmi"]
AMX_CPU_FLAGS = ("amx_tile", "amx_int8", "avx512vbmi")
AVX2_SOURCE = Path(__file__).with_name("quant_avx2.c")
INT4_FIT_SOURCE = Path(__file__).with_name("int4_fit.c")
AVX2_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-mavx2", "-mfma"]
AVX2_CPU_FLAGS = ("avx2", "fma")
INT4_INT8_SOURCE = Path(__file__).with_name("int4_int8.c")
INT4_INT8_BUILDS = {  # int4_int8.c's builds: compiler flags and the CPU flags they need
    "vbmi": (FLAGS + ["-mavx512vbmi"], CPU_FLAGS + ("avx512vbmi",)),
    "vnni": (FLAGS, CPU_FLAGS),
    "avx2": (AVX2_FLAGS, AVX2_CPU_FLAGS),
}
AMX_MAX_ROWS = 192  # below this many rows the AMX kernel beats the bf16 path (BENCHMARKS.md)
# From this many rows products dequantize the weight into bf16 tiles in L2, 128 rows at a time (int8_tiles_gemm), where
# the CPU has AMX-BF16: 1.1-1.6x the bf16 path, which dequantizes it into memory first, and at glm-4-9b's 40 layers
# from memory 1.09x the AMX kernel at 128 rows, 1.17-1.20x at 160-191, 0.94x at 96 (BENCHMARKS.md).
TILES_MIN_ROWS = 128
TILES_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
DEQUANTIZE_MIN_ROWS = 32  # from this many activation rows, dequantize + bf16 product (BENCHMARKS.md)
DEQUANTIZE_BLOCK_ROWS = 2048  # weight rows dequantized at a time (measured: 512 / 2048 / 8192)


def cpu_has(wanted: tuple[str, ...]) -> bool:
    """The CPU has every flag of `wanted` (as /proc/cpuinfo names them). GLM4SERVE_MAX_CPU_ISA=avx2 hides
    AVX-512 and AMX, as ONEDNN_MAX_CPU_ISA does for oneDNN: the kernels of a CPU without them, on one with."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if os.environ.get("GLM4SERVE_MAX_CPU_ISA", "").lower() == "avx2":
        flags = [f for f in flags if not f.startswith(("avx512", "amx"))]
    return all(f in flags for f in wanted)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "glm4serve" / "kernels"


def _compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


@functools.cache
def _compiler_version(compiler: str) -> bytes:
    """What `compiler --version` says: a library's contents depend on it (bf16_gemm.c's AMX part needs GCC 11)."""
    return subprocess.run([compiler, "--version"], capture_output=True).stdout


def _build(compiler: str, source_path: Path, flags: list[str]) -> Path:
    """The shared library, compiled once per source, included headers (and theirs), flags and compiler version
    (atomically: ranks may race)."""
    texts, seen = [source_path.read_bytes()], set()
    for text in texts:  # grows as headers name theirs
        for name in re.findall(rb'^\s*#\s*include "([^"]+)"', text, re.MULTILINE):
            if name not in seen:
                seen.add(name)
                texts.append(source_path.with_name(name.decode()).read_bytes())
    key = hashlib.sha256(b"".join(texts) + " ".join(flags).encode() + _compiler_version(compiler)).hexdigest()[:16]
    target = _cache_dir() / f"{source_path.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source_path), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


def load_library(source: Path, flags: list[str], cpu_flags: tuple[str, ...], otherwise: str) -> ctypes.CDLL | None:
    """`source` built (once) and loaded, where the CPU has `cpu_flags` and a C compiler exists; else
    None, logging why and what runs `otherwise`."""
    if not cpu_has(cpu_flags):
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler: %s", otherwise)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source, flags)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("%s not built (%s): %s", source.name, getattr(e, "stderr", None) or e, otherwise)
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, CPU_FLAGS, "int8 linears use torch's _weight_int8pack_mm")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.quantize_rows_int16.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.int8_int16_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.dequantize_bf16.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.dequantize_int4_bf16.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int]
    lib.int4_gemm.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    return lib


@functools.cache
def _amx_library() -> ctypes.CDLL | None:
    """int8_amx.c where the VNNI kernel is built, the CPU has AMX-INT8 and Linux grants its tiles."""
    if _library() is None or not cpu_has(AMX_CPU_FLAGS):
        return None
    try:
        lib = ctypes.CDLL(str(_build(_compiler(), AMX_SOURCE, AMX_FLAGS)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("int8 AMX kernel not built (%s): batches use the other int8 paths", getattr(e, "stderr", None) or e)
        return None
    if lib.amx_request() != 0:
        log.warning("Linux refused the AMX tile state: int8 batches use the other int8 paths")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.pack_activations.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.int8_amx_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.split_activations.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.int4_amx_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.int8_tiles_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.tiles_block.argtypes, lib.tiles_block.restype = [i64], i64
    lib.tiles_sums.argtypes, lib.tiles_sums.restype = [i64], i64
    lib.int4_tiles_gemm.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
    return lib


def tiles_available() -> bool:
    """The bf16 tiles run here (dequantized_tiles.h's int8_tiles_gemm, int4_tiles_gemm): int8_amx.c built, and
    AMX-BF16 with AVX-512 BF16."""
    return _amx_library() is not None and _has_tiles_flags()


@functools.cache
def _has_tiles_flags() -> bool:
    return cpu_has(TILES_CPU_FLAGS)


@functools.cache
def avx2_library() -> ctypes.CDLL | None:
    """quant_avx2.c built and loaded where the CPU has AVX2 and FMA (its int8_int16_gemm and int4_gemm take every
    product where the VNNI kernel is not built)."""
    lib = load_library(AVX2_SOURCE, AVX2_FLAGS, AVX2_CPU_FLAGS, "quantized linears use torch's kernels")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.quantize_rows_int16.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.int8_int16_gemm.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.int4_gemm.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    return lib


@functools.cache
def int4_int8_library(isa: str = "vbmi") -> ctypes.CDLL | None:
    """int4_int8.c built and loaded for INT4_INT8_BUILDS[isa] where the CPU has it: AVX-512 VNNI and VBMI ("vbmi"),
    AVX-512 VNNI alone ("vnni": its weights unpacked as AVX2's are), or AVX2 and FMA ("avx2")."""
    flags, cpu_flags = INT4_INT8_BUILDS[isa]
    lib = load_library(INT4_INT8_SOURCE, flags, cpu_flags, "int4 batches take int16 activations")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.int4_int8_gemm.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    return lib


def _int4_int8_kernel() -> ctypes.CDLL | None:
    """The int4_int8.c build for this CPU's quantized products: beside int8_gemm.c the VBMI build or, without VBMI
    (Cascade Lake), the VNNI one (1.00-1.02x the VBMI build's time at 4-512 rows on the AMD box, BENCHMARKS.md; not
    the AVX2 build, which int4_gemm's AVX-512 int16 products beat there: 16 rows 158-198 ms against 209-241 for
    8 layers' four products); AVX2's beside quant_avx2.c."""
    if available():
        return int4_int8_library("vbmi") or int4_int8_library("vnni")
    return int4_int8_library("avx2") if avx2_library() is not None else None


@functools.cache
def _int4_fit_library() -> ctypes.CDLL | None:
    lib = load_library(INT4_FIT_SOURCE, AVX2_FLAGS, AVX2_CPU_FLAGS,
                       "int4 groups' levels are spread over their range, not fitted (quant.int4_fit)")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.int4_fit.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    return lib


def int4_fit(groups: torch.Tensor, spreads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int4_fit.c's (scale, minimum) [G] fp32 of each row of groups [G, g] (fp32, contiguous), over the candidate
    spreads (fp32); None where it does not build."""
    lib = _int4_fit_library()
    if lib is None:
        return None
    n, g = groups.shape
    scale, low = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    lib.int4_fit(groups.data_ptr(), n, g, spreads.data_ptr(), spreads.numel(), scale.data_ptr(), low.data_ptr(),
                 torch.get_num_threads())
    return scale, low


def _kernel_library() -> ctypes.CDLL | None:
    """int8_gemm.c's library or, without AVX-512 VNNI, quant_avx2.c's: the same functions, the same numbers."""
    return _library() or avx2_library()


def available() -> bool:
    """int8_gemm.c (AVX-512 VNNI) runs here, and with it the bf16 blocks and (where the CPU has them) AMX."""
    return _library() is not None


def kernels_available() -> bool:
    """The int8 and int4 products run in this module's kernels: int8_gemm.c's (AVX-512 VNNI) or quant_avx2.c's."""
    return _kernel_library() is not None


def kernels() -> str:
    """Which of this module's kernels the quantized products take here, for the runner's description."""
    if _library() is None:
        if avx2_library() is None:
            return "torch's kernels"
        return "quant_avx2.c (AVX2)" + (" and int4_int8.c (AVX2)" if _int4_int8_kernel() is not None else "")
    if _amx_library() is not None:
        return "int8_gemm.c (AVX-512 VNNI) and int8_amx.c (AMX)"
    if _int4_int8_kernel() is None:
        return "int8_gemm.c (AVX-512 VNNI)"
    return "int8_gemm.c (AVX-512 VNNI) and int4_int8.c " + ("(VBMI)" if int4_int8_library("vbmi") else "(VNNI)")


def amx_fits(m: int, n: int, k: int) -> bool:
    """The AMX kernel takes this product: its row range, 32-row weight blocks, 64-byte input steps."""
    return 2 <= m < AMX_MAX_ROWS and n % 32 == 0 and k % 64 == 0 and _amx_library() is not None


def tiles_fit(m: int, n: int, k: int) -> bool:
    """int8_tiles_gemm takes this product: TILES_MIN_ROWS rows or more, 32-row weight blocks, 32-input steps."""
    return m >= TILES_MIN_ROWS and n % 32 == 0 and k % 32 == 0 and tiles_available()


def dequantize_bf16(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight int8 [N, K] * scale bf16 [N, 1] -> bf16 [N, K] (rounded to nearest even), into `out`."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=torch.bfloat16) if out is None else out
    _library().dequantize_bf16(weight.data_ptr(), scale.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight int8 [N, K] * scale bf16 [N, 1]).T: fp32 [M, N] through an integer kernel (AMX
    or VNNI, module docstring), else bf16 [M, N] with the weight dequantized a block at a time."""
    if tiles_fit(x.shape[0], *weight.shape):
        return int8_tiles_matmul(x, weight, scale)
    if amx_fits(x.shape[0], *weight.shape):
        return int8_amx_matmul(x, weight, scale)
    if x.shape[0] < DEQUANTIZE_MIN_ROWS or not available():  # without AVX-512, no bf16 blocks: all rows in AVX2
        return int8_matmul(x, weight, scale)
    return blockwise_matmul(x, weight.shape[0],
                            lambda r0, r1, block: dequantize_bf16(weight[r0:r1], scale[r0:r1], block.view(r1 - r0, -1)))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ the int4 weight (quant.py's Int4Linear: torch's CPU packed layout, the scales tile by tile)
    .T -> bf16 [M, N], the weight dequantized a block at a time (transposed: that layout runs along the rows)."""
    n, k = packed.shape[0], x.shape[1]

    def dequantize(r0: int, r1: int, block: torch.Tensor) -> torch.Tensor:
        w_t = block.view(k, r1 - r0)  # [K, rows]
        _library().dequantize_int4_bf16(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, group, r0, r1 - r0,
                                        w_t.data_ptr(), torch.get_num_threads())
        return w_t.t()  # [rows, K], a view

    return blockwise_matmul(x, n, dequantize)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A few rows x [M, K] @ the int4 weight (as int4_matmul takes it) .T -> fp32 [M, N]: the weights exact,
    the activations int16 (quantize_rows), as the int8 kernels; in int8_gemm.c (AVX-512 VNNI) or, without it,
    quant_avx2.c (or the library `lib`): the same numbers."""
    (m, k), n = x.shape, packed.shape[0]
    lib = lib or _kernel_library()
    xq, xs = quantize_rows(x, lib)
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int4_gemm(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, group, xq.data_ptr(), xs.data_ptr(), m,
                  y.data_ptr(), torch.get_num_threads())
    return y


def blockwise_matmul(x: torch.Tensor, n: int, dequantize) -> torch.Tensor:
    """x [M, K] @ W.T -> bf16 [M, N], W's rows DEQUANTIZE_BLOCK_ROWS at a time made bf16 by
    `dequantize(r0, r1, buffer) -> [r1 - r0, K]` and multiplied by oneDNN (AMX where the CPU has it):
    each block stays in cache between the two, and the buffer is small (56 MiB for glm-4-9b's down
    projection) and reused (_scratch_bf16)."""
    m, k = x.shape
    x = x.to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    buffer = _scratch_bf16(min(n, DEQUANTIZE_BLOCK_ROWS) * k)
    for r0 in range(0, n, DEQUANTIZE_BLOCK_ROWS):
        r1 = min(n, r0 + DEQUANTIZE_BLOCK_ROWS)
        y[:, r0:r1] = F.linear(x, dequantize(r0, r1, buffer[: (r1 - r0) * k]))
    return y


_scratch = threading.local()  # per thread: engines sharing a process each step on a thread of their own


def _scratch_bf16(numel: int) -> torch.Tensor:
    """A bf16 buffer of `numel` elements, kept for the next call on this thread. A fresh buffer
    over glibc's mmap threshold (32 MiB at most: glm-4-9b's down projection takes 56 MiB) is
    mapped anew at every call, and faulting its pages in cost 20-40 ms a call (BENCHMARKS.md)."""
    buffer = getattr(_scratch, "bf16", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.bf16 = torch.empty(numel, dtype=torch.bfloat16)
    return buffer[:numel]


def quantize_rows(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> int16 [M, K] and fp32 scales [M]: x ~ xq * xs per row (int16_rows.h, in
    `lib` or _kernel_library())."""
    m, k = x.shape
    x = x.to(torch.float32).contiguous()
    xq = torch.empty(m, k, dtype=torch.int16)
    xs = torch.empty(m, dtype=torch.float32)
    (lib or _kernel_library()).quantize_rows_int16(x.data_ptr(), m, k, xq.data_ptr(), xs.data_ptr(),
                                                   torch.get_num_threads())
    return xq, xs


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype) @ (weight int8 [N, K] * scale bf16 [N, 1]).T -> [M, N] fp32, in int8_gemm.c
    (AVX-512 VNNI) or, without it, quant_avx2.c (or the library `lib`): the same numbers."""
    (m, k), n = x.shape, weight.shape[0]
    lib = lib or _kernel_library()
    xq, xs = quantize_rows(x, lib)
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int8_int16_gemm(weight.data_ptr(), scale.data_ptr(), n, k, xq.data_ptr(), xs.data_ptr(), m, y.data_ptr(),
                        torch.get_num_threads())
    return y


def int8_amx_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product on AMX tiles (amx_fits(M, N, K) must hold) -> [M, N] fp32, the same numbers."""
    lib = _amx_library()
    (m, k), n = x.shape, weight.shape[0]
    xq, xs = quantize_rows(x)
    packed = ((m + 15) // 16) * k * 16  # the activations' high and low bytes in tile order, 16 rows a group
    hi, lo = torch.empty(packed, dtype=torch.int8), torch.empty(packed, dtype=torch.uint8)
    lib.pack_activations(xq.data_ptr(), m, k, hi.data_ptr(), lo.data_ptr(), torch.get_num_threads())
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int8_amx_gemm(weight.data_ptr(), scale.data_ptr(), n, k, hi.data_ptr(), lo.data_ptr(), xs.data_ptr(), m,
                      y.data_ptr(), torch.get_num_threads())
    return y


def int8_tiles_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight int8 [N, K] * scale bf16 [N, 1]).T -> bf16 [M, N] on AMX-BF16 tiles (tiles_fit(M, N, K) must
    hold): the weight dequantized to bf16 as dequantize_bf16 has it, the sums in fp32 rounded once."""
    lib, threads = _amx_library(), torch.get_num_threads()
    (m, k), n = x.shape, weight.shape[0]
    x, tail, y, tiles, sums = _tiles_operands(lib, threads, x, n)
    lib.int8_tiles_gemm(weight.data_ptr(), scale.data_ptr(), n, k, x.data_ptr(), tail.data_ptr(), m, y.data_ptr(),
                        tiles.data_ptr(), sums.data_ptr(), threads)
    return y


def _tiles_operands(lib: ctypes.CDLL, threads: int, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """For the tiles kernels (dequantized_tiles.h): x bf16; its last M % 32 rows padded to 32 (the kernels take
    activation rows 32 at a time; x itself is not copied, 14 ms for glm-4-9b's down projection at 2,048 rows); y bf16
    [M, N]; each thread's block of dequantized weights (kept for the next call) and its sums between chunks of the
    inputs (fresh: their pages are touched only where K is chunked)."""
    m, k = x.shape
    x = x.to(torch.bfloat16).contiguous()
    tail = F.pad(x[m // 32 * 32 :], (0, 0, 0, -m % 32)) if m % 32 else x  # x: not read
    return (x, tail, torch.empty(m, n, dtype=torch.bfloat16), _scratch_bf16(threads * lib.tiles_block(k)),
            torch.empty(threads * lib.tiles_sums(m), dtype=torch.float32))


# int4 products of these many rows run on AMX tiles. glm-4-9b's 40 layers' products from memory (BENCHMARKS.md):
# int4_amx_gemm against int4_gemm 1.03x at 6 rows, 1.18x at 8, 1.6x at 12, 2.3-2.5x at 32-48 (int4_gemm reads the
# weights again for every 4 rows; the tiles' floor is ~2x one row's time); against the dequantized bf16 blocks
# 2.3x at 64 rows, 1.4x at 128, 1.2x at 160, 0.95x at 192. Where the CPU has AMX-BF16, int4_tiles_gemm takes the
# rows from INT4_TILES_MIN_ROWS on.
INT4_AMX_ROWS = range(6, 161)
INT4_AMX_MAX_ROWS = 192  # int8_amx.c's: the most rows its sums hold
# From this many rows int4 products dequantize the weight into bf16 tiles in L2 (int4_tiles_gemm), where the CPU has
# AMX-BF16. glm-4-9b's 40 layers' products from memory (BENCHMARKS.md): against int4_amx_gemm 1.0x at 48 rows, 1.23x
# at 56, 1.7-2.0x at 128-192; against the bf16 blocks 1.76x at 192, 1.46x at 512, 1.22x at 1,024.
INT4_TILES_MIN_ROWS = 56
# without AMX, from this many rows int4 products take int8 activations (int4_int8.c): 1.2x int4_gemm at 4 rows from
# memory, ~1.0x at 1-3, where one read of the weights binds both (BENCHMARKS.md); beside quant_avx2.c (AVX2 alone)
# every row count, where its int4_gemm's vpmaddwd bind it: the 40-layer step 1.06-1.17x at one row (int4_int8.c's
# AVX2 build reads it in place), the same at 2 rows, 1.10-1.27x a layer at 3
INT4_INT8_MIN_ROWS = 4
INT4_INT8_AVX2_MIN_ROWS = 1


def int4_amx_fits(m: int, n: int, k: int, group: int) -> bool:
    """int4_amx_gemm takes the product: groups of 64 inputs (a tile's depth), m in INT4_AMX_ROWS."""
    return m in INT4_AMX_ROWS and group == 64 and n % 64 == 0 and k % 64 == 0 and _amx_library() is not None


def int4_amx_gemm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """int4_gemm's product (the same operands, int4_amx_fits must hold) on AMX tiles -> fp32 [M, N]."""
    lib = _amx_library()
    (m, k), n = x.shape, packed.shape[0]
    assert 1 <= m <= INT4_AMX_MAX_ROWS and group == 64 and n % 64 == 0 and k % 64 == 0, (m, n, k, group)
    xq, xs = quantize_rows(x)
    rows = (m + 15) // 16 * 16
    hi, lo = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows, k, dtype=torch.uint8)
    gsum = torch.empty(m, k // 64, dtype=torch.float32)
    threads = torch.get_num_threads()
    lib.split_activations(xq.data_ptr(), m, k, hi.data_ptr(), lo.data_ptr(), gsum.data_ptr(), threads)
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int4_amx_gemm(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, hi.data_ptr(), lo.data_ptr(),
                      gsum.data_ptr(), xs.data_ptr(), m, y.data_ptr(), threads)
    return y


def int4_tiles_fit(m: int, n: int, k: int, group: int) -> bool:
    """int4_tiles_gemm takes the product: INT4_TILES_MIN_ROWS rows or more, whole pack tiles, groups of a multiple
    of 32 inputs (a chunk of the inputs is whole groups), where the CPU has AMX-BF16."""
    return m >= INT4_TILES_MIN_ROWS and n % 64 == 0 and group % 32 == 0 and k % group == 0 and tiles_available()


def int4_tiles_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                      group: int) -> torch.Tensor:
    """int4_matmul's product (the weight dequantized to bf16 as dequantize_int4_bf16 has it, times bf16 activations,
    the sums in fp32 rounded once) on AMX-BF16 tiles, int4_tiles_fit must hold -> bf16 [M, N]."""
    lib, threads = _amx_library(), torch.get_num_threads()
    (m, k), n = x.shape, packed.shape[0]
    x, tail, y, tiles, sums = _tiles_operands(lib, threads, x, n)
    lib.int4_tiles_gemm(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, group, x.data_ptr(), tail.data_ptr(), m,
                        y.data_ptr(), tiles.data_ptr(), sums.data_ptr(), threads)
    return y


def int4_int8_min_rows() -> int:
    """Rows from which int4 products take int4_int8.c: INT4_INT8_MIN_ROWS beside int8_gemm.c, else (AVX2 alone)
    INT4_INT8_AVX2_MIN_ROWS."""
    return INT4_INT8_MIN_ROWS if available() else INT4_INT8_AVX2_MIN_ROWS


def int4_int8_fits(m: int, n: int, k: int, group: int) -> bool:
    """int4_int8_gemm takes the product: int4_int8_min_rows() rows or more, groups of 32 or 64 inputs, where
    int4_int8.c builds, on a CPU without AMX-INT8 or in groups AMX's int4 kernel does not take (its tiles take
    batches in groups of 64 with int16 activations: a GGUF file's 4-bit blocks are groups of 32)."""
    return (m >= int4_int8_min_rows() and group in (32, 64) and n % 64 == 0 and k % group == 0
            and (_amx_library() is None or group != 64) and _int4_int8_kernel() is not None)


def int4_int8_gemm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                   lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """int4_gemm's product with the activations quantized to int8 per group of inputs (int4_int8.c: half the
    multiplies; this CPU's build, or the library `lib`: the same numbers) -> fp32 [M, N]."""
    (m, k), n = x.shape, packed.shape[0]
    x = x.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    (lib or _int4_int8_kernel()).int4_int8_gemm(packed.data_ptr(), scales_and_zeros.data_ptr(), n, k, group,
                                                x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())
    return y
