"""float32 linear layers on CPU, fast for decode.

Decode is a matrix-vector product per layer, bound by memory reads. Measured on the project's
2-core box (BENCHMARKS.md), reading the 310 MB output layer of a GLM-4-shaped model:

| product             | PyTorch `F.linear` (MKL) | oneDNN packed | compiled reduction (inductor) |
|---------------------|--------------------------|---------------|-------------------------------|
| 1 row  (one stream) | ~11 GB/s                 | ~27 GB/s      | ~32 GB/s (the machine: ~34)   |
| 32 rows             | 75 ms                    | 25 ms         | (re-reads the weight per row) |

So every fp32 CPU linear holds its weight packed by oneDNN for a batch of 32 (the packing hint
changes oneDNN's layout: 30-45% faster at 32 rows than the batch-1 hint, equal at one row). The
output layer, when too big for the cache (one decoding stream is then bound by reading it), also
keeps a plain copy for one-row products, computed as `(W * x).sum(-1)`: inductor fuses that into
one reduction that streams W once at nearly the machine's read bandwidth. The copy doubles that
matrix's memory (+310 MB for a 151,552 x 512 layer, +2.5 GB for glm-4-9b's, 7% of it in fp32).
"""

from __future__ import annotations

import logging
import mmap

import torch
from torch import nn

log = logging.getLogger(__name__)

PACK_BATCH_HINT = 32  # oneDNN picks its weight layout for this many rows
STREAMED_WEIGHT_BYTES = 64 << 20  # above this a weight lives in DRAM, not cache, during decode


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in memory the kernel may back with 2 MiB pages (Linux transparent huge
    pages, "madvise" mode). Streaming a big weight through 4 KiB pages costs TLB misses: measured
    8-25% more read bandwidth with huge pages on the project's box. Elsewhere: a plain copy."""
    nbytes, align = t.numel() * t.element_size(), 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.contiguous().clone()
    buf = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = (-raw.data_ptr()) % align  # huge pages need 2 MiB-aligned memory
    out = raw[start : start + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t)


def _one_row_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [out, in], x [1, in] -> [1, out]; compiled, the product is never materialized."""
    return (weight * x).sum(-1)[None]


def compile_one_row_product(weight: torch.Tensor):
    """The compiled kernel, warmed for this weight's shape now rather than on the first request
    (inductor caches it on disk too), or None where inductor cannot compile (no C++ compiler)."""
    try:
        fn = torch.compile(_one_row_product, dynamic=False, fullgraph=True)
        with torch.inference_mode():
            fn(weight, torch.zeros(1, weight.shape[1], dtype=weight.dtype))
        return fn
    except Exception as e:  # noqa: BLE001 - whatever failed, oneDNN still works
        log.warning("inductor could not compile the one-row product (%s); using oneDNN only", e)
        return None


class PackedLinear(nn.Module):
    """pack=False: oneDNN reads the plain weight (`.plain`, shared with cpu_decode.py's compiled
    graphs): ~equal at one row, ~30% slower than packed at 32 rows, and no second copy."""

    def __init__(self, linear: nn.Linear, streamed_weight_bytes: float | None = None, pack: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.one_row = None
        if not pack:
            self.plain = self.packed = hugepage_copy(weight)  # [out, in]
            return
        # weight [out, in] re-laid out in oneDNN's blocked format (an opaque mkldnn tensor)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self.plain = None  # [out, in], kept only for the one-row kernel
        if streamed_weight_bytes is None:
            streamed_weight_bytes = STREAMED_WEIGHT_BYTES
        if weight.numel() * weight.element_size() > streamed_weight_bytes:
            plain = hugepage_copy(weight)
            self.one_row = compile_one_row_product(plain)
            if self.one_row is not None:
                self.plain = plain
                log.info("a %d x %d fp32 weight keeps a plain copy (+%.0f MB) for one-row products",
                         self.out_features, self.in_features, plain.numel() * plain.element_size() / 1e6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row is not None and x.shape[0] == 1:
            y = self.one_row(self.plain, x)
            return y if self.bias is None else y + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, one_row_kernel_for: tuple[str, ...] = ("lm_head",),
                 plain_for: tuple[str, ...] = ()) -> int:
    """Swap every fp32 CPU nn.Linear of `model` for a PackedLinear, in place. Returns how many.

    Only the layers named in one_row_kernel_for (by attribute name) may keep the plain copy for the
    one-row kernel: the output layer, the biggest matrix of a GLM-4 and most of a small model's
    decode time. Doubling every big matrix would double a 9B fp32 model (37 GB) for ~20% on each.
    Those named in plain_for stay unpacked (for cpu_decode.py, which reads them plain)."""
    if not packing_available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                threshold = None if name in one_row_kernel_for else float("inf")
                setattr(parent, name, PackedLinear(child, streamed_weight_bytes=threshold, pack=name not in plain_for))
                swapped += 1
    return swapped
