"""The CPU runner: fp32 and bf16 linears as CpuLinears, int8/int4 ones quantized (quant.py), and
in fp32 one decoding sequence's step compiled.

Every fp32 or bf16 linear becomes a CpuLinear (cpu_linear.py): oneDNN-packed for batches of several
rows, or plain for bf16_gemm.c's decode rows (bf16, where that kernel is built). fp32 models over
COMPILED_DECODE_MIN_BYTES of weights (where a C++ compiler exists) also run a single sequence's
decode step, one token through every layer, as graphs compiled by inductor: in eager PyTorch each
layer is ~45 small ops and 4 matrix-vector products, and on a small model the ops' dispatch costs
as much as reading the weights. The graphs call glm4.py's own methods;
their layers' linears hold plain weights, which a compiled graph reads as one fused reduction.

Inductor compiles the pieces of segments.py, between the K/V cache writes. Each compiled call costs
~40 us of dynamo and wrapper time, so the seams are where writing the new token's K/V into the
cache forces them (the writes stay eager here; the CUDA runner's pieces hold theirs). Measured on the
engine benchmark's model: a decode step ~2 ms shorter (BENCHMARKS.md).

Attention itself runs inside the next graph (attention.decode_attention_one) while the context is
at most IN_GRAPH_ATTENTION_MAX_TOKENS, compiled once for any number of blocks: there it saves the
eager gather and SDPA call, ~0.3 ms of a ~8-12 ms step on the engine benchmark's model. Inductor's
kernel reads the values once per query head and 16 dimensions, so its cost grows faster with the
context than SDPA's: measured even at ~3K tokens and behind at 4K, so longer contexts take graphs
without it. Batches of several rows run the eager layers.

bf16 and quantized models decode eagerly: their bf16 (bf16_gemm.c, else oneDNN) and int8/int4
kernels already read the weights at least as fast as inductor's reductions (BENCHMARKS.md), and at
glm-4-9b's sizes the eager ops between the linears cost a few percent of a token.

Every model over COMPILED_DECODE_MIN_BYTES (where a compiler exists) also runs its norms and SwiGLU
compiled on inputs of COMPILED_ROWS_MIN rows and more (prefill chunks, big batches): eager, each of
their ops makes a pass over the activations (RMSNorm in bf16 seven), where inductor makes one. At
glm-4-9b's shapes, a 2,048-row chunk: RMSNorm 21.5 -> 1.8 ms, SwiGLU 40 -> 28 ms; prompts of 2K-16K
tokens 1.05-1.11x faster (BENCHMARKS.md, "Long prefill on CPU"). Fewer rows run eagerly: a compiled
call's ~40 us of dynamo and wrapper time is more than those ops cost on a decode's rows.
"""

from __future__ import annotations

import logging
import shutil

import torch

from . import int8_kernel, segments
from .attention import decode_attention_one, paged_attention, write_kv
from .batch import ForwardBatch
from .cpu_linear import STREAMED_WEIGHT_BYTES, hugepage_backing, hugepage_copy, hugepage_empty, swap_linears
from .glm4 import GLM4Model, Layer, RMSNorm, SwiGLU
from .quant import Int4Linear, Int8Linear, is_quantized
from .runner import EagerRunner

COMPILED_DECODE_MIN_BYTES = 64 << 20  # below this, compile time outweighs the step's few microseconds
COMPILED_ROWS_MIN = 64  # norms and SwiGLU on this many rows and more run compiled (module docstring)
IN_GRAPH_ATTENTION_MAX_TOKENS = 2048  # longer contexts attend with eager SDPA (module docstring)
LAYER_LINEARS = ("qkv", "o", "gate_up", "down")

log = logging.getLogger(__name__)


def compiler_available() -> bool:
    """Inductor's CPU kernels are C++: without a compiler (the slim Docker image) nothing compiles."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def move_quantized_weights_to_hugepages(model: torch.nn.Module) -> None:
    """Each int8/int4 weight into huge-page memory (cpu_linear.hugepage_empty), one at a time: their
    one-row products stream them from memory, ~3% faster a decode step on glm-4-9b's shapes. An int4
    weight's scales too, which those products stream beside it."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.qweight = hugepage_copy(m.qweight)
        elif isinstance(m, Int4Linear):
            m.packed = hugepage_copy(m.packed)
            m.scales_and_zeros = hugepage_copy(m.scales_and_zeros)


def log_hugepage_backing(short_of: float = 0.9) -> None:
    """How much of the weights (and the KV cache written so far) the kernel backs with huge pages: a warning
    when under `short_of` of it, since a decode step then reads them slower."""
    backed, resident = hugepage_backing()
    if resident < STREAMED_WEIGHT_BYTES:  # a small model, or not Linux: nothing to say
        return
    if backed >= short_of * resident:
        log.info("weights in huge pages: %.2f of %.2f GiB", backed / 2**30, resident / 2**30)
    else:
        log.warning("only %.2f of %.2f GiB of weights in huge pages (the box's memory is fragmented): decode may "
                    "run ~10%% slower; `echo 1 > /proc/sys/vm/compact_memory` (root) before starting the server "
                    "gives the kernel free 2 MiB runs again (README, \"On a CPU\")", backed / 2**30, resident / 2**30)


def nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights, parameters and buffers (a quantized linear's are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class CpuRunner(EagerRunner):
    def __init__(self, model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int | None = None,
                 compile_decode: bool = True, kv_dtype: torch.dtype | None = None):
        fp32_dense = model.embed.weight.dtype == torch.float32 and not is_quantized(model)
        fp32_dense = fp32_dense and kv_dtype in (None, torch.float32)  # the graphs read a cache of the model's dtype
        big = nbytes(model) > COMPILED_DECODE_MIN_BYTES  # measured now: packed weights are not counted
        # a tensor-parallel shard decodes eagerly: its collectives (tp.py) run between the layers' ops
        self.compile_decode = compile_decode
        self.compiled = compile_decode and fp32_dense and model.shard.world == 1 and big and compiler_available()
        # The output layer joins the last graph (a plain weight) when decode is bound by reading it;
        # a small one stays packed for batches (cpu_linear.py).
        head_plain = (self.compiled and isinstance(model.lm_head, torch.nn.Linear)
                      and nbytes(model.lm_head) > STREAMED_WEIGHT_BYTES)
        swap_linears(model, plain_for=(LAYER_LINEARS if self.compiled else ()) + (("lm_head",) if head_plain else ()))
        move_quantized_weights_to_hugepages(model)
        # The KV cache in huge pages too: decode streams it like the weights.
        super().__init__(model, num_blocks, block_size, vocab_limit, kv_zeros=hugepage_empty, kv_dtype=kv_dtype)
        self.compiled_rows = big and compiler_available()
        if self.compiled_rows:  # first: the one-token graphs trace through the wrapped modules
            compile_elementwise(model)
        self.one_token = OneTokenStep(model, block_size, head_plain) if self.compiled else None
        log_hugepage_backing()

    def __repr__(self) -> str:
        if self.compiled:
            decode = "compiled one-token decode"
        elif self.dtype != torch.float32 or is_quantized(self.model) or self.kv_dtype != self.dtype:
            decode = "eager decode"
        elif not self.compile_decode:
            decode = "eager decode (LoRA adapters)"
        elif self.model.shard.world > 1:
            decode = "eager decode (a tensor-parallel rank)"
        else:
            decode = "eager decode (small model)" if compiler_available() else "eager decode (no C++ compiler)"
        linears = {type(m).__name__ for m in self.model.modules() if hasattr(m, "in_features")}
        # which kernel, by the CPU's instruction sets: a user on an AVX2 box sees what runs
        if "Int8Linear" in linears:
            linears = linears - {"Int8Linear"} | {f"Int8Linear in {int8_kernel.kernels()}"}
        int4 = [m for m in self.model.modules() if isinstance(m, Int4Linear)]
        if int4:
            kernels = int8_kernel.kernels() if any(m.tiled for m in int4) else "torch's kernels"
            linears = linears - {"Int4Linear"} | {f"Int4Linear in {kernels}"}
        rows = ", compiled norms and SwiGLU for many rows" if self.compiled_rows else ""
        kv = f", KV cache {str(self.kv_dtype).removeprefix('torch.')}" if self.kv_dtype != self.dtype else ""
        return f"CpuRunner({self.dtype}, {'/'.join(sorted(linears))}, {decode}{rows}{kv})"

    def forward(self, b: ForwardBatch) -> torch.Tensor:
        if self.one_token is not None and b.input_ids.shape[0] == 1 and b.logits_indices.shape[0] == 1:
            return self.one_token(self.model, b, self.kv)  # a one-token batch is always one decode
        return super().forward(b)


def _call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class ManyRowsCompiled(torch.nn.Module):
    """An elementwise module of glm4.py (RMSNorm, SwiGLU), `compiled_call(module, x)` on inputs of
    COMPILED_ROWS_MIN rows and more, itself eagerly on fewer (and inside a graph being compiled)."""

    def __init__(self, module: torch.nn.Module, compiled_call):
        super().__init__()
        self.module, self.compiled_call = module, compiled_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= COMPILED_ROWS_MIN and not torch.compiler.is_compiling():
            return self.compiled_call(self.module, x)
        return self.module(x)


def compile_elementwise(model: GLM4Model) -> None:
    """Wrap every RMSNorm and SwiGLU of the model in a ManyRowsCompiled, in place, and compile them
    now, not on the first prefill. One compile serves every layer and any number of rows: the
    module is the graph's input, and the rows a dynamic dimension."""
    call = torch.compile(_call, dynamic=True, fullgraph=True)
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, (RMSNorm, SwiGLU))]
    for parent, name in places:
        setattr(parent, name, ManyRowsCompiled(getattr(parent, name), call))
    cfg, layer, dtype = model.cfg, model.layers[0], model.embed.weight.dtype
    with torch.inference_mode():  # as in a forward: grad mode is one of dynamo's guards
        layer.input_norm(torch.zeros(COMPILED_ROWS_MIN, cfg.hidden_size, dtype=dtype))
        layer.mlp.act(torch.zeros(COMPILED_ROWS_MIN, 2 * layer.mlp.down.in_features, dtype=dtype))


def _attend_between(layer: Layer, next_layer: Layer, x, q, k_cache, v_cache, block_table, context_len, cos, sin):
    attn = decode_attention_one(q, k_cache, v_cache, block_table, context_len, layer.attn.scale)
    return segments.between(layer, next_layer, x, attn, cos, sin)


class OneTokenStep:
    """A single new token through every layer, the final norm and (when it holds a plain weight)
    the output layer: 1 + num_layers compiled calls, with the K/V writes (and, for long contexts,
    paged attention) eager between them."""

    def __init__(self, model: GLM4Model, block_size: int, head_in_graph: bool):
        last = segments.last_with_head if head_in_graph else segments.last_without_head
        self.head_in_graph = head_in_graph

        def attend_last(layer, model, x, q, k_cache, v_cache, block_table, context_len):
            attn = decode_attention_one(q, k_cache, v_cache, block_table, context_len, layer.attn.scale)
            return last(layer, model, x, attn)

        compile = lambda fn, dynamic=False: torch.compile(fn, dynamic=dynamic, fullgraph=True)  # noqa: E731
        self.first, self.between = compile(segments.first), compile(segments.between)
        self.last = compile(last)
        # dynamic=None: static shapes but for the dimensions warm_up marks dynamic (the cache's and
        # the block table's), so one compile serves every context length
        self.attend_between, self.attend_last = compile(_attend_between, None), compile(attend_last, None)
        self.warm_up(model, block_size)

    def __call__(self, model: GLM4Model, b: ForwardBatch, kv) -> torch.Tensor:
        """-> logits [1, V]. One decode: one block table, one context length."""
        layers, last = model.layers, len(model.layers) - 1
        x = model.embed(b.input_ids)  # [1, H]
        cos, sin = model.rotary(b.positions)  # [1, D] each
        q, k, v = self.first(layers[0], x, cos, sin)
        context_len = b.attn.decode_context_lens  # [1]
        if int(context_len[0]) > IN_GRAPH_ATTENTION_MAX_TOKENS:
            out = self._eager_attention(model, x, q, k, v, cos, sin, kv, b)
        else:
            table = b.attn.decode_block_tables[0]
            if table.shape[0] < 2:  # one block: a second, masked out, keeps the length a dynamic dimension
                table = torch.cat((table, table))
            for i in range(last):
                write_kv(kv.k[i], kv.v[i], k, v, b.attn)
                x, q, k, v = self.attend_between(layers[i], layers[i + 1], x, q, kv.k[i], kv.v[i], table,
                                                 context_len, cos, sin)
            write_kv(kv.k[last], kv.v[last], k, v, b.attn)
            out = self.attend_last(layers[last], model, x, q, kv.k[last], kv.v[last], table, context_len)
        return out if self.head_in_graph else model.lm_head(out).float()

    def _eager_attention(self, model: GLM4Model, x, q, k, v, cos, sin, kv, b: ForwardBatch) -> torch.Tensor:
        """The same step with eager paged attention between the graphs, for long contexts."""
        layers, last = model.layers, len(model.layers) - 1
        for i in range(last):
            attn = paged_attention(q, k, v, kv.k[i], kv.v[i], b.attn, layers[i].attn.scale).flatten(1)
            x, q, k, v = self.between(layers[i], layers[i + 1], x, attn, cos, sin)
        attn = paged_attention(q, k, v, kv.k[last], kv.v[last], b.attn, layers[last].attn.scale).flatten(1)
        return self.last(layers[last], model, x, attn)

    def warm_up(self, model: GLM4Model, block_size: int) -> None:
        """Compile the graphs now, with inputs laid out as in a forward, not on the first request.
        A KV cache of another block size would compile the attending graphs again when first used."""
        cfg, layers, dtype = model.cfg, model.layers, model.embed.weight.dtype
        with torch.inference_mode():
            x = torch.zeros(1, cfg.hidden_size, dtype=dtype)
            cos, sin = model.rotary(torch.zeros(1, dtype=torch.long))
            attn = torch.zeros(1, cfg.q_size, dtype=dtype)
            q, k, _ = self.first(layers[0], x, cos, sin)
            if len(layers) > 1:
                self.between(layers[0], layers[1], x, attn, cos, sin)
            self.last(layers[-1], model, x, attn)
            # The KV cache's number of blocks stays dynamic, as the table's length does (distinct
            # sizes above 1: equal ones would be taken for one symbol). The block size stays
            # static: a division by a constant in the kernels' indexing, not by a variable.
            table, context_len = torch.tensor([0, 4]), torch.tensor([block_size + 1])
            with torch.inference_mode(False):  # as the real cache: a normal tensor (dynamo guards on it)
                k_cache, v_cache = (torch.zeros(7, block_size, *k.shape[1:], dtype=dtype) for _ in "kv")
            for t in (k_cache, v_cache, table):
                torch._dynamo.mark_dynamic(t, 0)
            if len(layers) > 1:
                self.attend_between(layers[0], layers[1], x, q, k_cache, v_cache, table, context_len, cos, sin)
            self.attend_last(layers[-1], model, x, q, k_cache, v_cache, table, context_len)
