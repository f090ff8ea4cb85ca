"""A decode step of glm4.py's model cut at its K/V cache writes, for the runners that compile the
pieces in between (cpu_runner.py on CPU, cuda_runner.py on GPU).

Eager, each of a layer's ~35 small ops (the bf16 RMSNorm's seven, the rotary's slices and casts, the
residual adds, SiLU and the product) is a pass over the activations of its own; inductor compiles
what lies between two K/V writes into a few fused kernels around the matrix products. The pieces:
[norm -> qkv -> rotary] before the first write (`first`), [o -> residual -> norm -> gate/up ->
SwiGLU -> down -> residual -> next layer's norm -> qkv -> rotary] between two layers (`between`),
and after the last [o ... residual -> final norm (-> output layer)] (`last_*`). The attention reading
the writes stays eager between the compiled calls; the writes too on CPU, while the CUDA runner
compiles them into the piece that makes the K/V. Each piece calls the model's own methods; the
layers are the compiled graphs' inputs, so one compile serves every layer.
"""

from __future__ import annotations

import torch

from .glm4 import GLM4Model, Layer


def first(layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The residual stream x [T, H] -> the first layer's q, k, v."""
    return layer.before_attention(x, cos, sin)


def between(layer: Layer, next_layer: Layer, x: torch.Tensor, attn: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor):
    """Layer i's end (its attention's output attn [T, Hq * D]) and layer i + 1's start -> (x [T, H], q, k, v)."""
    x = layer.after_attention(x, attn)
    return (x, *next_layer.before_attention(x, cos, sin))


def last_with_head(layer: Layer, model: GLM4Model, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return model.logits(layer.after_attention(x, attn))  # [T, V] fp32


def last_without_head(layer: Layer, model: GLM4Model, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return model.norm(layer.after_attention(x, attn))  # [T, H]: the output layer runs on its own


def one_row_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [out, in], x [1, in] -> [1, out]: traced into a piece, inductor's reduction over the
    weight (the product is never materialized), for the runners' one-row linears."""
    return (weight * x).sum(-1)[None]
