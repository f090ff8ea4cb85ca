"""The batch-1 decode step's matrix products, for the CUDA runner (cuda_runner.py).

At batch 1 a linear is a matrix-vector product and its time is the weight's bytes over the card's
bandwidth: cuBLAS's kernels took 5.07 of an H200's 6.58 ms 40-layer step, and each small op around a
product is a kernel of its own, a few microseconds plus a gap in the replayed graph. So the batch-1
graph may run:
- each named linear (ONE_ROW_PRODUCTS) by gemv.py's Triton kernel in the blocks that read its weights
  fastest on this GPU, or by inductor's reduction over the weight (RowProductLinear; chosen at load by
  timing, fastest_one_row_kernels);
- with all four of a layer's linears on gemv.py's kernel, a decode layer whose small ops that kernel
  does around its products (`Folded`): the norms before qkv, gate_up and the output layer, the bias
  and rotary after qkv and its k and v stored into the cache, SwiGLU after gate_up and the residual
  adds after o and down. A layer is then 6 launches: the attention kernel, the merge of its splits
  and the four products; the step's first piece also computes the embedding and the rotary's angles.
  The folded step takes the kernel's best blocks for each of the four even where cuBLAS's product was
  faster alone (launches saved may be worth more), the best of the plain kernel's fastest few timed
  again with the options the folded layer launches it with; the CUDA runner times the step whole
  against the step of the products' own choices and keeps the faster.
  These pieces restate Layer.after_attention and Attention.project of glm4.py's `glm` variant with
  that kernel's options, and are checked against them (tests/test_one_row.py); the `glm4` variant's
  extra norms, LoRA adapters (their own wrappers of the linears) and tensor parallelism keep the
  compiled model's own methods.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv, segments
from .glm4 import GLM4Model, Layer
from .paged_decode import merge_splits

log = logging.getLogger(__name__)

ONE_ROW_PRODUCTS = ("qkv", "o", "gate_up", "down", "lm_head")  # the model's linears, by attribute name
FOLDED_PRODUCTS = ONE_ROW_PRODUCTS[:4]  # a layer's: all on gemv.py's kernel for the folded pieces
FOLDED_CANDIDATES = 3  # a folded product's blocks timed again with its options: the fastest plain ones


class RowProductLinear(nn.Module):
    """An nn.Linear (its own weight and bias, not copied) whose product with one row, traced by dynamo,
    is gemv.py's Triton kernel in `blocks`, or else inductor's reduction over the weight (a GEMV kernel
    of its making, the output fused into what follows); every other product is F.linear's (cuBLAS).
    `pdl`: the kernel launched with programmatic dependent launch where the GPU has it."""

    def __init__(self, linear: nn.Linear, blocks: gemv.Blocks | None = None):
        super().__init__()
        self.weight, self.bias, self.blocks = linear.weight, linear.bias, blocks
        self.pdl = True

    def kernel(self) -> str:
        return f"Triton {self.blocks}" if self.blocks else "reduction"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and torch.compiler.is_compiling():
            if self.blocks is not None:
                return gemv.linear(x, self.weight, self.bias, self.blocks, pdl=self.pdl)
            y = segments.one_row_product(self.weight, x)  # [1, out]
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def named_linears(model: GLM4Model, names) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, linear) of each plain nn.Linear of `model` under one of `names` (a LoRA's
    or a runner's wrapper is not one), in the model's order."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and name in names]


def swap_row_product_linears(model: GLM4Model, kernels: Mapping[str, gemv.Blocks | None]
                             ) -> list[tuple[nn.Module, str, nn.Linear]]:
    """The model's nn.Linear layers named in `kernels` (ONE_ROW_PRODUCTS) wrapped in RowProductLinear
    with the blocks given for their name, in place -> (parent, name, linear) of each, to put them back."""
    if unknown := set(kernels) - set(ONE_ROW_PRODUCTS):
        raise ValueError(f"no such linears: {sorted(unknown)}; the model's are {ONE_ROW_PRODUCTS}")
    places = named_linears(model, kernels)
    for parent, name, linear in places:
        setattr(parent, name, RowProductLinear(linear, kernels[name]))
    return places


def fastest_one_row_kernels(model: GLM4Model) -> tuple[dict[str, gemv.Blocks], dict[str, gemv.Blocks]]:
    """On a GPU, for each of ONE_ROW_PRODUCTS, gemv.py's kernel in the blocks that read the model's
    weights of that linear fastest and agree with cuBLAS (gemv.fastest), timed with every layer's
    weight in turn, a few seconds (and Triton's compiles the first time) at load -> (those of the
    products where they beat cuBLAS on this card: the others stay cuBLAS's; those of every product
    where any ran: the folded layer's, which the CUDA runner times against the other whole). For the
    folded layer's four, the FOLDED_CANDIDATES fastest blocks are timed again with the options the
    folded layer launches them with (gemv.fastest_with), and the fastest of those taken."""
    chosen, best = {}, {}
    for name in ONE_ROW_PRODUCTS:
        linears = [linear for _, _, linear in named_linears(model, (name,))]
        if not linears:
            continue
        weights = [linear.weight for linear in linears]
        try:
            over_cublas, fastest, report = gemv.fastest(weights)
        except Exception as e:  # noqa: BLE001 - the timing's own failure leaves cuBLAS's product, not no server
            log.warning("timing the one-row %s products failed, cuBLAS's run them: %s: %s", name, type(e).__name__, e)
            continue
        log.info("one-row %s: cuBLAS %.1f us, gemv.py's best %s -> %s", name, report["cublas"]["us"],
                 f"{fastest} {report[str(fastest)]['us']:.1f} us" if fastest else "none ran",
                 f"Triton {over_cublas}" if over_cublas else "cuBLAS")
        if over_cublas is not None:
            chosen[name] = over_cublas
        if fastest is not None and name in FOLDED_PRODUCTS and _folds(model):
            candidates = [b for b in gemv.agreed_fastest_first(report) if b.rows % 2 == 0][:FOLDED_CANDIDATES]
            try:
                folded, times = gemv.fastest_with(weights, candidates, linears[0].bias, timing_options(model, name))
            except Exception as e:  # noqa: BLE001 - the plain kernel's timing stands
                log.warning("timing the folded %s products failed: %s: %s", name, type(e).__name__, e)
                folded, times = None, {}
            log.info("one-row %s folded: %s", name, " ".join(f"{b} {t}" for b, t in times.items()) or "not timed")
            fastest = folded if folded is not None else fastest
        if fastest is not None:
            best[name] = fastest
    return chosen, best


def _on_kernel(linear: nn.Module) -> bool:
    # blocks of one row would split SwiGLU's and the rotary's pairs
    return isinstance(linear, RowProductLinear) and linear.blocks is not None and linear.blocks.rows % 2 == 0


def _folds(model: GLM4Model) -> bool:
    """The models the folded pieces restate: the `glm` variant, whole (no tensor-parallel shard)."""
    return model.cfg.variant == "glm" and model.shard.world == 1


def can_fold(model: GLM4Model) -> bool:
    """Whether `Folded`'s pieces run this model: one they restate (_folds), every layer's four linears
    on gemv.py's kernel (RowProductLinear with blocks of even rows)."""
    return _folds(model) and all(_on_kernel(m) for layer in model.layers
                                 for m in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down))


def folded_options(layer: Layer, name: str, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                   kv: tuple | None = None, residual: torch.Tensor | None = None) -> dict:
    """gemv.linear's options as the folded layer launches its product `name` (FOLDED_PRODUCTS), given
    the step's tensors they take: the rotary's cos and sin and the K/V slots (k_slots, v_slots, slot)
    for qkv, the residual stream for o and down."""
    if name == "qkv":  # the input norm; the bias (the linear's own), rotary of q and k heads, K/V store
        attn, norm = layer.attn, layer.input_norm
        rotated = (attn.num_heads + attn.num_kv_heads) * attn.head_dim
        return dict(norm=(norm.weight, norm.eps), rotary=(cos, sin, rotated), store_kv=kv)
    if name == "gate_up":  # the norm before the MLP, SwiGLU after
        return dict(norm=(layer.mlp_norm.weight, layer.mlp_norm.eps), swiglu=True)
    return dict(residual=residual)  # o, down: the residual add


def timing_options(model: GLM4Model, name: str) -> dict:
    """folded_options of the first layer with stand-ins for the step's tensors, for timing the product
    (what they hold does not change its time): position 0, a cache of one slot, a residual of zeros."""
    layer = model.layers[0]
    weight = layer.attn.qkv.weight
    cos, sin = model.rotary(torch.zeros(1, dtype=torch.long, device=weight.device))  # [1, D] each
    k_slots, v_slots = torch.zeros(2, 1, layer.attn.num_kv_heads, layer.attn.head_dim, dtype=weight.dtype,
                                   device=weight.device)  # [1 slot, Hkv, D] each
    slot = torch.zeros(1, dtype=torch.long, device=weight.device)
    residual = torch.zeros(1, model.cfg.hidden_size, dtype=weight.dtype, device=weight.device)
    return folded_options(layer, name, cos, sin, (k_slots, v_slots, slot), residual)


def _product(linear: RowProductLinear, x: torch.Tensor, **options) -> torch.Tensor:
    return gemv.linear(x, linear.weight, linear.bias, linear.blocks, pdl=linear.pdl, **options)


def _qkv(layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_slots, v_slots, slots):
    """Layer.before_attention of one row x [1, H] and the K/V store: input norm, qkv and its bias, the
    rotary of q and k, k and v into the layer's cache at the slot, in one kernel -> q [1, Hq, D]."""
    attn = layer.attn
    options = folded_options(layer, "qkv", cos, sin, kv=(k_slots, v_slots, slots))
    qkv = _product(attn.qkv, x, **options)  # [1, (Hq + 2 Hkv) * D]
    return qkv[:, : attn.num_heads * attn.head_dim].view(1, attn.num_heads, attn.head_dim)  # [1, Hq, D]


def _after_attention(layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Layer.after_attention of one row (the `glm` variant): x + o(attn), then that plus the MLP of its
    norm, in three kernels."""
    x = _product(layer.attn.o, attn, **folded_options(layer, "o", residual=x))  # [1, H]
    h = _product(layer.mlp.gate_up, x, **folded_options(layer, "gate_up"))  # [1, F]
    return _product(layer.mlp.down, h, **folded_options(layer, "down", residual=x))  # [1, H]


def _first(model: GLM4Model, ids, positions, k_slots, v_slots, slots):
    """The step's start: the token's embedding, the rotary's cos and sin for its position, the first
    layer's qkv (and K/V store) -> (x, cos, sin, q)."""
    x = model.embed(ids)  # [1, H]
    cos, sin = model.rotary(positions)  # [1, D] each
    return x, cos, sin, _qkv(model.layers[0], x, cos, sin, k_slots, v_slots, slots)


def _merge_between(layer: Layer, next_layer: Layer, x, partials, cos, sin, k_slots, v_slots, slots):
    attn = merge_splits(*partials, layer.attn.num_heads).to(x.dtype)  # [1, Hq, D]
    x = _after_attention(layer, x, attn.flatten(1))
    return x, _qkv(next_layer, x, cos, sin, k_slots, v_slots, slots)


def _merge_last(layer: Layer, model: GLM4Model, x, partials):
    attn = merge_splits(*partials, layer.attn.num_heads).to(x.dtype)  # [1, Hq, D]
    x = _after_attention(layer, x, attn.flatten(1))
    if _on_kernel(model.lm_head):  # the final norm in the output layer's kernel
        return _product(model.lm_head, x, norm=(model.norm.weight, model.norm.eps)).float()  # [1, V]
    return model.logits(x)


class Folded:
    """The pieces of a batch-1 decode step whose small ops gemv.py's kernel does (the module's doc),
    compiled as the CUDA runner compiles its others (compiled_layers.compile_piece, with `pdl` for its
    kernels of its own: the merge of the attention's splits, the logits' cast): the first layer's qkv
    (and K/V store) after the embedding and the rotary's angles, then for each layer its attention's
    merge, its end and the next one's qkv."""

    def __init__(self, compile_piece, pdl: bool = False):
        self.pdl = pdl
        self.first = compile_piece(_first, pdl=pdl)
        self.merge_between = compile_piece(_merge_between, pdl=pdl)
        self.merge_last = compile_piece(_merge_last, pdl=pdl)
