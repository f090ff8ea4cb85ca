"""fp32 and bf16 linear layers on CPU, fast for decode (the CPU runner's, cpu_runner.py).

Decode is a matrix-vector product per layer, bound by memory reads. Measured on the project's
2-core box (BENCHMARKS.md), reading the 310 MB output layer of a GLM-4-shaped model in fp32:

| product             | PyTorch `F.linear` (MKL) | oneDNN packed | compiled reduction (inductor) |
|---------------------|--------------------------|---------------|-------------------------------|
| 1 row  (one stream) | ~11 GB/s                 | ~27 GB/s      | ~32 GB/s (the machine: ~34)   |
| 32 rows             | 75 ms                    | 25 ms         | (re-reads the weight per row) |

So a CpuLinear holds its weight in one copy, either packed by oneDNN for a batch of 32 (the packing
hint changes oneDNN's layout: 30-45% faster at 32 rows than the batch-1 hint, equal at one row), or
plain in huge-page memory:
- packed: every product goes through oneDNN.
- plain: inside a compiled graph (the CPU runner's one-token decode step) a one-row product is
  `(W * x).sum(-1)`, which inductor fuses into one reduction that streams W once at nearly the
  machine's read bandwidth; eager products (batches, a prefill's last row) go through oneDNN over
  the plain weight (~equal at one row, ~30% slower at 32 rows than packed).
No weight is ever held twice: a second copy of glm-4-9b's output layer alone would be +2.5 GB in fp32.

bf16 weights, where the CPU has AVX-512 BF16 and a C compiler exists, are held plain too: products of
up to bf16_kernel.max_rows(weight) rows (decode batches: 128 on AMX tiles, 48 without AMX) run in bf16_gemm.c,
which reads them at about the memory's rate where oneDNN reads slower (bf16_kernel.py); larger ones go through oneDNN
over the plain weight, which on the project's box is as fast as over a packed one from 8 rows on
(BENCHMARKS.md, "bf16 decode in our own kernel"). Elsewhere bf16 weights are packed by oneDNN (one copy),
where oneDNN multiplies bf16 at all: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which most CPUs with AVX2
alone lack (it refuses to pack there, and the server would not load); there bf16 weights stay plain and their
products run in bf16_gemm.c's AVX2 kernel (bf16_kernel.avx2_available()), or without it through F.linear
(torch's own bf16 product, 2.4-3.4x slower).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16_kernel
from .segments import one_row_product

PACK_BATCH_HINT = 32  # oneDNN picks its weight layout for this many rows
# oneDNN compiles one primitive per product shape (rows x weight) and PyTorch's ideep keeps its own entry
# beside it: ~0.6-2.6 MiB a shape, and both keep 1,024 shapes by default. A server's prefill chunks come in
# every length, so a long run filled both: ~1.5 GB of resident memory. A step reuses its few shapes in
# every layer; 128 keeps those of ~25 recent steps (BENCHMARKS.md, "oneDNN's shape caches").
ONEDNN_CACHED_SHAPES = 128
STREAMED_WEIGHT_BYTES = 64 << 20  # above this a weight lives in DRAM, not cache, during decode


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_takes(dtype: torch.dtype) -> bool:
    """oneDNN multiplies `dtype` on this CPU (bf16: see the module docstring)."""
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def limit_onednn_caches(shapes: int = ONEDNN_CACHED_SHAPES) -> None:
    """Cap oneDNN's and ideep's caches of compiled products at `shapes` entries each, unless the user's
    environment sets them. Both read their capacity once, at their first product: call before any."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(shapes))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(shapes))


def hugepage_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous tensor in memory the kernel may back with 2 MiB pages (Linux transparent
    huge pages, "madvise" mode). Streaming a big weight or KV cache through 4 KiB pages costs TLB
    misses: measured 8-25% more read bandwidth with huge pages on the project's box. Elsewhere: zeros."""
    nbytes, align = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = (-raw.data_ptr()) % align  # huge pages need 2 MiB-aligned memory
    return raw[start : start + nbytes].view(dtype).view(shape)


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    return hugepage_empty(tuple(t.shape), t.dtype).copy_(t)


def hugepage_backing(smaps: str | None = None) -> tuple[int, int]:
    """(bytes backed by 2 MiB pages, bytes resident) over this process's memory that asked for huge pages
    (hugepage_empty's mappings: `hg` in their VmFlags), from /proc/self/smaps or its text. The kernel backs
    memory with huge pages only where it finds free 2 MiB runs when the memory is first written: on a box
    whose memory is fragmented the two differ, and what lies in 4 KiB pages is read ~10% slower
    (README, "On a CPU"). (0, 0) where there is no such file (not Linux)."""
    if smaps is None:
        try:
            smaps = Path("/proc/self/smaps").read_text()
        except OSError:
            return 0, 0
    backed = resident = 0
    fields: dict[str, int] = {}

    def close() -> None:
        nonlocal backed, resident
        if fields.pop("hg", 0):
            backed, resident = backed + fields.get("AnonHugePages", 0), resident + fields.get("Rss", 0)
        fields.clear()

    for line in smaps.splitlines():
        key, _, value = line.partition(":")
        if key == "VmFlags":
            fields["hg"] = "hg" in value.split()
        elif key in ("Rss", "AnonHugePages"):
            fields[key] = int(value.split()[0]) << 10  # kB
        elif " " in key:  # a mapping's first line ("start-end perms offset dev inode path"): the last one's end
            close()
    close()
    return backed, resident


class CpuLinear(nn.Module):
    """An fp32 or bf16 nn.Linear's weight held packed (oneDNN) or plain (huge pages); see above."""

    def __init__(self, linear: nn.Linear, plain: bool, bf16_kernel_rows: int | None = None):
        """bf16_kernel_rows: products of at most this many rows run in bf16_gemm.c, the weight plain
        (default: bf16_kernel.kernel_rows(weight); 0 = never)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        if bf16_kernel_rows is None:
            bf16_kernel_rows = bf16_kernel.kernel_rows(weight)
        self.kernel_rows = bf16_kernel_rows
        self.onednn = onednn_takes(weight.dtype)
        plain = plain or self.kernel_rows > 0 or not self.onednn
        self.plain = hugepage_copy(weight) if plain else None  # [out, in]
        # packed: [out, in] re-laid out in oneDNN's blocked format (an opaque mkldnn tensor)
        self.weight = self.plain if plain else torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and x.shape[0] == 1 and torch.compiler.is_compiling():
            y = one_row_product(self.plain, x)  # traced into a graph: the fused reduction
            return y if self.bias is None else y + self.bias
        if x.dim() == 2 and x.shape[0] <= self.kernel_rows and x.dtype == torch.bfloat16:
            return bf16_kernel.matmul(x, self.plain, self.bias)
        if not self.onednn:
            return F.linear(x, self.plain, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def swap_linears(model: nn.Module, plain_for: tuple[str, ...]) -> int:
    """Replace every fp32 or bf16 nn.Linear of `model` by a CpuLinear, in place, the old weight dropped:
    those whose attribute name is in plain_for hold a plain weight, the others a packed one.
    Returns how many were swapped."""
    # (parent, name) pairs, not the linears: each old weight is freed as soon as its copy replaces it,
    # so loading holds one weight twice at most, never the model (glm-4-9b in bf16: 18.8 GB)
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, nn.Linear) and child.weight.dtype in (torch.float32, torch.bfloat16)]
    for parent, name in places:
        setattr(parent, name, CpuLinear(getattr(parent, name), plain=name in plain_for))
    return len(places)
