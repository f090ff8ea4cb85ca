"""One decoding sequence on CPU in fp32: the layers as compiled graphs around paged attention.

A single stream's decode step is one token through every layer. In eager PyTorch each layer is
~45 small ops and 4 matrix-vector products, and on a small model the ops' dispatch costs as much as
reading the weights. Here inductor compiles what lies between two K/V cache writes: [norm -> qkv
-> rotary] before the first, [o -> residual -> norm -> gate/up -> SwiGLU -> down -> residual ->
next layer's norm -> qkv -> rotary] between two layers, and after the last [o ... residual ->
final norm -> output layer]. Every matrix-vector product is written as `(W * x).sum(-1)` (one
fused reduction that streams W once, see cpu_linear.py). Each compiled call costs ~40 us of dynamo
and wrapper time, so the seams are where writing the new token's K/V into the cache forces them
(the writes stay eager; writing into the cache, a graph input, from inside a graph was not tried).
Measured on the engine benchmark's model: a decode step ~2 ms shorter (BENCHMARKS.md). The graphs
take the weights as arguments, so one compile serves every layer.

Attention itself runs inside the next graph (`attend`: the sequence's blocks gathered by index,
scores, softmax, weighted values), compiled once for any number of blocks, while the context is
at most IN_GRAPH_ATTENTION_MAX_TOKENS: there it saves the eager gather and SDPA call, ~0.3 ms
of a ~8-12 ms step on the engine benchmark's model. Inductor's kernel reads the values once per
query head and 16 dimensions, so its cost grows faster with the context than SDPA's: measured
even at ~3K tokens and behind at 4K, so longer contexts take graphs without it.

Batches of several rows keep the eager layers; the layers' weights are then used unpacked by
oneDNN (cpu_linear.py), so that this path costs no second copy of them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .attention import AttentionBatch, paged_attention, write_kv
from .config import ModelConfig

COMPILED_DECODE_MIN_BYTES = 64 << 20  # below this, compile time outweighs the step's few microseconds
IN_GRAPH_ATTENTION_MAX_TOKENS = 2048  # longer contexts attend with eager SDPA (module docstring)

log = logging.getLogger(__name__)


def make_graphs(cfg: ModelConfig):
    """The step's compiled functions for this model's shapes (one token, fp32): the first layer's
    attention input; the seam between two layers and the last layer's end with the output layer,
    each once taking the attention's output and once attending itself. Each matrix-vector product
    is a fused reduction over the weight."""
    hq, hkv, d, r, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim, cfg.rms_norm_eps
    sandwich = cfg.variant == "glm4"
    scale = d**-0.5

    def norm(x, weight):  # fp32 here, so GLM-4's RMSNorm is exactly torch's
        return F.rms_norm(x, weight.shape, weight, eps)

    def attn_in(x, norm_w, qkv_w, qkv_b, cos, sin):
        """x [1, H] -> q [1, Hq, D], k [1, Hkv, D], v [1, Hkv, D], q and k rotated."""
        qkv = (qkv_w * norm(x, norm_w)).sum(-1)  # [(Hq + 2 Hkv) * D]
        if qkv_b is not None:
            qkv = qkv + qkv_b
        qk = qkv[: (hq + hkv) * d].view(hq + hkv, d)  # q and k heads rotate alike
        # glm4.Rotary's rotation in real arithmetic: inductor does not compile its complex multiply
        pairs = qk[:, :r].view(hq + hkv, r // 2, 2)  # interleaved pairs (x0, x1)
        x0, x1 = pairs[..., 0], pairs[..., 1]  # [Hq + Hkv, r / 2]
        rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).view(hq + hkv, r)
        qk = torch.cat((rotated, qk[:, r:]), dim=-1)  # [Hq + Hkv, D]
        return qk[None, :hq], qk[None, hq:], qkv[(hq + hkv) * d :].view(1, hkv, d)

    def attn_out_mlp(x, attn, o_w, post_attn_w, mlp_norm_w, gate_up_w, down_w, post_mlp_w):
        """x [1, H], attn [1, Hq * D] -> the layer's output [1, H]."""
        h = (o_w * attn).sum(-1)[None]  # [1, H]
        x = x + (norm(h, post_attn_w) if sandwich else h)
        gate, up = (gate_up_w * norm(x, mlp_norm_w)).sum(-1).chunk(2)  # [I] each
        h = (down_w * (F.silu(gate) * up)).sum(-1)[None]  # [1, H]
        return x + (norm(h, post_mlp_w) if sandwich else h)

    def between_layers(x, attn, out_w: tuple, in_w: tuple, cos, sin):
        """Layer i's end and layer i + 1's start -> (x [1, H], q, k, v)."""
        x = attn_out_mlp(x, attn, *out_w)
        return (x, *attn_in(x, *in_w, cos, sin))

    def last_layer_out(x, attn, out_w: tuple, final_norm_w, lm_head_w):
        """The last layer's end, the final norm and, given its weight, the output layer ->
        logits [1, V] (or the normed hidden state [1, H] when lm_head_w is None)."""
        x = norm(attn_out_mlp(x, attn, *out_w), final_norm_w)
        return x if lm_head_w is None else (lm_head_w * x).sum(-1)[None]

    def attend(q, k_cache, v_cache, block_table, context_len):
        """q [1, Hq, D] over the sequence's cached keys/values -> [1, Hq * D]. block_table [nb] and
        context_len [1] (this token included); caches [blocks, block_size, Hkv, D]."""
        k = k_cache[block_table].flatten(0, 1).transpose(0, 1)  # [nb, bs, Hkv, D] -> [L, Hkv, D] -> [Hkv, L, D]
        v = v_cache[block_table].flatten(0, 1).transpose(0, 1)
        qg = q.view(hkv, hq // hkv, d)  # [Hkv, G, D]: each KV head's group of query heads
        scores = (qg[:, :, None, :] * k[:, None]).sum(-1) * scale  # [Hkv, G, L]
        valid = torch.arange(k.shape[1]) < context_len  # [L]: the last block's unused slots are out
        probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        return (probs[..., None] * v[:, None]).sum(2).view(1, hq * d)  # [Hkv, G, L, D] -> [Hkv, G, D] -> [1, Hq * D]

    def attend_between_layers(x, q, k_cache, v_cache, block_table, context_len, out_w: tuple, in_w: tuple,
                              cos, sin):
        return between_layers(x, attend(q, k_cache, v_cache, block_table, context_len), out_w, in_w, cos, sin)

    def attend_last_layer_out(x, q, k_cache, v_cache, block_table, context_len, out_w: tuple, final_norm_w,
                              lm_head_w):
        return last_layer_out(x, attend(q, k_cache, v_cache, block_table, context_len), out_w, final_norm_w,
                              lm_head_w)

    compile = lambda fn, dynamic=False: torch.compile(fn, dynamic=dynamic, fullgraph=True)  # noqa: E731
    # dynamic=None: static shapes but for the dimensions warm_up marks dynamic (the cache's and
    # the block table's), so one compile serves every context length
    return (compile(attn_in), compile(between_layers), compile(last_layer_out),
            compile(attend_between_layers, None), compile(attend_last_layer_out, None))


class OneTokenLayers:
    """Runs a single new token through every layer, the final norm and the output layer: 1 +
    num_layers compiled calls, with the K/V writes (and, for long contexts, paged attention) eager
    between them. It reads the weights the model holds: the layers' linears unpacked
    (`model.layers[i].attn.qkv.plain` and so on), the output layer's plain copy where it keeps one
    (cpu_linear.py), else the output layer itself."""

    def __init__(self, model):
        self.first, self.between, self.last, self.attend_between, self.attend_last = make_graphs(model.cfg)
        self.hidden_q = model.cfg.num_heads * model.cfg.head_dim
        self.w_in, self.w_out = [], []  # per layer: attn_in's weights, attn_out_mlp's weights
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            post_attn = layer.post_attn_norm.weight if layer.sandwich else None
            post_mlp = layer.post_mlp_norm.weight if layer.sandwich else None
            self.w_in.append((layer.input_norm.weight, attn.qkv.plain, attn.qkv.bias))
            self.w_out.append((attn.o.plain, post_attn, layer.mlp_norm.weight, mlp.gate_up.plain, mlp.down.plain,
                               post_mlp))
        self.final_norm_w = model.norm.weight
        self.lm_head = model.lm_head
        plain = getattr(model.lm_head, "plain", None)
        self.lm_head_w = plain if model.lm_head.bias is None else None  # None: lm_head runs on its own
        self.scale = model.layers[0].attn.scale

    def __call__(self, x, rot, kv, batch: AttentionBatch) -> torch.Tensor:
        """x [1, H] (the new token's embedding), rot [1, rotary_dim / 2] complex -> logits [1, V].
        A one-token batch is always one decode (batch.py): one block table, one context length."""
        cos, sin = rot.real, rot.imag  # [1, rotary_dim / 2] each
        q, k, v = self.first(x, *self.w_in[0], cos, sin)
        last = len(self.w_out) - 1
        context_len = batch.decode_context_lens  # [1]
        if int(context_len[0]) > IN_GRAPH_ATTENTION_MAX_TOKENS:
            return self._eager_attention(x, q, k, v, cos, sin, kv, batch)
        table = batch.decode_block_tables[0]
        if table.shape[0] < 2:  # one block: a second, masked out, keeps the length a dynamic dimension
            table = torch.cat((table, table))
        for i in range(last):
            write_kv(kv.k[i], kv.v[i], k, v, batch.slot_mapping)
            x, q, k, v = self.attend_between(x, q, kv.k[i], kv.v[i], table, context_len, self.w_out[i],
                                             self.w_in[i + 1], cos, sin)
        write_kv(kv.k[last], kv.v[last], k, v, batch.slot_mapping)
        out = self.attend_last(x, q, kv.k[last], kv.v[last], table, context_len, self.w_out[last],
                               self.final_norm_w, self.lm_head_w)
        return out if self.lm_head_w is not None else self.lm_head(out)

    def _eager_attention(self, x, q, k, v, cos, sin, kv, batch: AttentionBatch) -> torch.Tensor:
        """The same step with eager paged attention between the graphs, for long contexts."""
        last = len(self.w_out) - 1
        for i in range(last):
            attn = paged_attention(q, k, v, kv.k[i], kv.v[i], batch, self.scale).view(1, self.hidden_q)
            x, q, k, v = self.between(x, attn, self.w_out[i], self.w_in[i + 1], cos, sin)
        attn = paged_attention(q, k, v, kv.k[last], kv.v[last], batch, self.scale).view(1, self.hidden_q)
        out = self.last(x, attn, self.w_out[last], self.final_norm_w, self.lm_head_w)
        return out if self.lm_head_w is not None else self.lm_head(out)

    def warm_up(self, hidden_size: int, rotary_dim: int, kv_block_size: int) -> None:
        """Compile the graphs now, with inputs laid out as in a forward, not on the first request.
        A KV cache of another block size would compile the attending graphs again when first used."""
        with torch.inference_mode():
            x = torch.zeros(1, hidden_size)
            rot = torch.polar(torch.ones(1, rotary_dim // 2), torch.zeros(1, rotary_dim // 2))
            attn = torch.zeros(1, self.hidden_q)
            q, k, _ = self.first(x, *self.w_in[0], rot.real, rot.imag)
            if len(self.w_out) > 1:
                self.between(x, attn, self.w_out[0], self.w_in[1], rot.real, rot.imag)
            self.last(x, attn, self.w_out[-1], self.final_norm_w, self.lm_head_w)
            # The KV cache is not built yet: its number of blocks stays dynamic, as the table's length
            # does (distinct sizes above 1: equal ones would be taken for one symbol). The block size
            # stays static: a division by a constant in the kernels' indexing, not by a variable.
            table, context_len = torch.tensor([0, 4]), torch.tensor([kv_block_size + 1])
            with torch.inference_mode(False):  # as the real cache: a normal tensor (dynamo guards on it)
                k_cache, v_cache = (torch.zeros(7, kv_block_size, *k.shape[1:]) for _ in "kv")  # [blocks, bs, Hkv, D]
            torch._dynamo.mark_dynamic(k_cache, 0)
            torch._dynamo.mark_dynamic(v_cache, 0)
            torch._dynamo.mark_dynamic(table, 0)
            if len(self.w_out) > 1:
                self.attend_between(x, q, k_cache, v_cache, table, context_len, self.w_out[0], self.w_in[1],
                                    rot.real, rot.imag)
            self.attend_last(x, q, k_cache, v_cache, table, context_len, self.w_out[-1], self.final_norm_w,
                             self.lm_head_w)


LINEARS = ("qkv", "o", "gate_up", "down")  # the layers' linears that the graphs read plain


def compile_one_token_layers(model, kv_block_size: int) -> OneTokenLayers | None:
    """For a model whose layer linears are unpacked (pack_linears(plain_for=LINEARS)); None where
    inductor cannot compile (no C++ compiler): the eager layers then serve every batch."""
    try:
        layers = OneTokenLayers(model)
        layers.warm_up(model.cfg.hidden_size, model.cfg.rotary_dim, kv_block_size)
        return layers
    except Exception as e:  # noqa: BLE001 - whatever failed, the eager layers still work
        log.warning("inductor could not compile the one-token decode step (%s); using eager layers", e)
        return None
