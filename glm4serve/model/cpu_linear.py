"""float32 linear layers on CPU with oneDNN-packed weights.

Decode is a matrix-vector product per layer, bound by memory reads. On the machines we measured,
PyTorch's default fp32 `F.linear` reads weights at ~11 GB/s, a pre-packed oneDNN weight at
~29 GB/s (benchmarks/bench_model.py and BENCHMARKS.md). The packed op is the one inductor uses
for frozen CPU graphs; where it is missing we keep the plain layers.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # weight [out, in] re-laid out in oneDNN's blocked format (an opaque mkldnn tensor)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Swap every fp32 CPU nn.Linear of `model` for a PackedLinear, in place. Returns how many."""
    if not packing_available():
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped
