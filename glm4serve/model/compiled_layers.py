"""A model's steps as segments.py's pieces compiled by inductor (CompiledLayers), what the CUDA runner
runs and captures: each layer's products with the small ops around them fused into a few Triton
kernels, each piece storing the K/V it makes in the cache, attention between the pieces; decode steps'
attention splits (paged_decode.py's kernel) merged in the piece after it. Batch-1 decodes may run
one_row.py's folded pieces instead, compiled the same way (compile_piece).
"""

from __future__ import annotations

import torch

from . import segments
from .attention import AttentionBatch, cached_attention, store_kv
from .batch import ForwardBatch
from .glm4 import GLM4Model, Layer
from .kv_cache import KVCache
from .one_row import Folded
from .paged_decode import merge_splits, paged_decode_partials

RECOMPILES_PER_RUNNER = 8  # a piece compiles about 3 times for a runner: the largest batch, any batch, one row


def _first(layer: Layer, x, cos, sin, k_slots, v_slots, slots):
    """segments.first, with its K/V stored in the layer's cache (KVCache.k_slots, v_slots) -> q. Stored
    as they are: the attention kernel reads no slot past a context (attention.write_kv)."""
    q, k, v = segments.first(layer, x, cos, sin)
    store_kv(k_slots, v_slots, k, v, slots, finite=False)
    return q


def _between(layer: Layer, next_layer: Layer, x, attn, cos, sin, k_slots, v_slots, slots):
    """segments.between, with the next layer's K/V stored in its cache -> (x, q)."""
    x, q, k, v = segments.between(layer, next_layer, x, attn, cos, sin)
    store_kv(k_slots, v_slots, k, v, slots, finite=False)
    return x, q


def _merge_between(layer: Layer, next_layer: Layer, x, partials, cos, sin, k_slots, v_slots, slots):
    """_between, after merging layer i's attention splits [T, Hkv, S, GP, D] (and maxima, sums)."""
    attn = merge_splits(*partials, layer.attn.num_heads).to(x.dtype)  # [T, Hq, D]
    return _between(layer, next_layer, x, attn.flatten(1), cos, sin, k_slots, v_slots, slots)


def _merge_last(layer: Layer, model: GLM4Model, x, partials):
    attn = merge_splits(*partials, layer.attn.num_heads).to(x.dtype)  # [T, Hq, D]
    return segments.last_with_head(layer, model, x, attn.flatten(1))  # [T, V] fp32


def compile_piece(fn, pdl: bool = False):
    """fn compiled by inductor for a step of few rows, where each kernel launched costs more than the
    bytes it moves (`pdl`: its kernels launched with programmatic dependent launch on sm_90 and newer,
    inductor's triton.enable_pdl):
    - its elementwise kernels in one configuration each. Inductor would time their candidates on the
      first call, and a kernel that writes the KV cache it times on a copy of the cache, made in host
      memory when the card has no room for it: with a cache that fills the card, gigabytes over PCIe
      for every timed launch;
    - kernels of the same size fused even where they share only a few bytes of what they read (the
      K and V stores share only the slots): one launch instead of two."""
    return torch.compile(fn, fullgraph=True, dynamic=None, options={
        "triton.autotune_pointwise": False, "score_fusion_memory_threshold": 1, "triton.enable_pdl": pdl})


class CompiledLayers:
    """The model's steps through segments.py's pieces compiled by inductor, each layer's K/V stored by
    the piece that makes them: 1 + num_layers compiled calls, attention eager between them. Compiled on
    the first call of each kind of shape (the capture's warm-up, the first prefill), not when made;
    dynamic=None: static at first, the rows made dynamic when a second number of rows comes."""

    def __init__(self):
        # dynamo counts a function's compiles across the process, against a limit of 8 by default: a
        # process that loads more than one model (the benchmark, the tests) would have the later ones
        # fall back to the layers as written. Each runner brings room for its own few.
        torch._dynamo.config.recompile_limit += RECOMPILES_PER_RUNNER
        self.first = compile_piece(_first)
        # decodes: the attention kernel's splits merged in the piece after it
        self.merge_between, self.merge_last = compile_piece(_merge_between), compile_piece(_merge_last)
        # prefill and mixed steps: attention's output whole (attention.cached_attention)
        self.between, self.last = compile_piece(_between), compile_piece(segments.last_without_head)
        # batch-1 decodes, where one_row.can_fold: every kernel launched with PDL (the runner's `pdl`)
        self.folded_pieces = Folded(compile_piece, pdl=True)

    @torch.inference_mode()
    def decode(self, model: GLM4Model, ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch,
               kv: KVCache, folded: bool = False, pdl: bool = False) -> torch.Tensor:
        """One token of each of T sequences -> their logits [T, V] fp32; `folded`: one row, through
        one_row.py's folded pieces; `pdl`: the attention kernel launched with PDL."""
        pieces = self.folded_pieces if folded else self
        layers, slots = model.layers, attn.slot_mapping
        if folded:  # the embedding and the rotary's angles in the first piece
            x, cos, sin, q = pieces.first(model, ids, positions, kv.k_slots[0], kv.v_slots[0], slots)
        else:
            x = model.embed(ids)  # [T, H]
            cos, sin = model.rotary(positions)  # [T, D] each
            q = pieces.first(layers[0], x, cos, sin, kv.k_slots[0], kv.v_slots[0], slots)
        for i, layer in enumerate(layers):
            partials = paged_decode_partials(q, kv.k[i], kv.v[i], attn.decode_block_tables, attn.decode_context_lens,
                                             layer.attn.scale, pdl=pdl)
            if i + 1 < len(layers):
                x, q = pieces.merge_between(layer, layers[i + 1], x, partials, cos, sin, kv.k_slots[i + 1],
                                            kv.v_slots[i + 1], slots)
        return pieces.merge_last(layers[-1], model, x, partials)

    @torch.inference_mode()
    def forward(self, model: GLM4Model, b: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Any batch (prompt spans and decodes) -> logits [N, V] fp32 of its logits_indices rows."""
        layers, slots = model.layers, b.attn.slot_mapping
        x = model.embed(b.input_ids)  # [T, H]
        cos, sin = model.rotary(b.positions)  # [T, D] each
        q = self.first(layers[0], x, cos, sin, kv.k_slots[0], kv.v_slots[0], slots)
        for i, layer in enumerate(layers):
            out = cached_attention(q, kv.k[i], kv.v[i], b.attn, layer.attn.scale).flatten(1)  # [T, Hq * D]
            if i + 1 < len(layers):
                x, q = self.between(layer, layers[i + 1], x, out, cos, sin, kv.k_slots[i + 1], kv.v_slots[i + 1],
                                    slots)
        x = self.last(layers[-1], model, x, out)  # [T, H], normed
        return model.lm_head(x.index_select(0, b.logits_indices)).float()  # [N, V]
