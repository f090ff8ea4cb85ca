"""GLM-4 in plain PyTorch, top to bottom: norm, rotary, attention, MLP, layer, model.

Covers both math variants: `glm` (glm-4-9b-chat, chatglm and -hf checkpoints) and `glm4`
(0414 / Z1: extra norms on the attention and MLP outputs). Inputs are a flat batch of new tokens
of many sequences; K/V live in the paged cache (see attention.py). Parameter names are ours;
loader.py holds the one table that maps checkpoint names onto them.

This file is the only home of GLM-4's math. Each layer is split at the attention seam
(`before_attention`, `after_attention`) so that the model runners (runner.py, cpu_runner.py)
that compile or capture parts of a step call these same methods instead of copies of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBatch, paged_attention
from .config import DTYPES, ModelConfig, Yarn
from .kv_cache import KVCache
from .shard import Shard


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same math, one fused op instead of seven
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # variance in fp32 whatever the model dtype; cast back before the weight, as GLM-4 does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def yarn_inv_freq(inv_freq: torch.Tensor, theta: float, yarn: Yarn) -> torch.Tensor:
    """Each pair's frequency under YaRN [rotary_dim / 2]: divided by the factor for the pairs that turn less than
    beta_slow times over the trained context, kept for those that turn more than beta_fast times, a linear
    ramp over the pairs between."""
    dim = 2 * len(inv_freq)  # rotary_dim

    def pair_turning(turns: float) -> float:  # the (fractional) pair that turns `turns` times over the context
        return dim * math.log(yarn.original_max_positions / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(yarn.beta_fast), pair_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high if high != low else high + 0.001
    stretched = ((torch.arange(len(inv_freq), dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / yarn.factor * stretched + inv_freq * (1 - stretched)


class Rotary(nn.Module):
    """Partial, interleaved (GPT-J style) RoPE: only the first `rotary_dim` dims of each head rotate,
    in pairs (x0, x1), (x2, x3), ...; the rest pass through. Pair j of a token at position p turns
    by the angle p * theta^(-2j / rotary_dim), or as YaRN stretches it."""

    def __init__(self, rotary_dim: int, theta: float, head_dim: int, yarn: Yarn | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        if yarn is not None:
            inv_freq = yarn_inv_freq(inv_freq, theta, yarn)
        # per dim of a head: each pair's frequency twice, 0 past rotary_dim (an angle of 0: cos 1, sin 0)
        per_dim = F.pad(inv_freq.repeat_interleave(2), (0, head_dim - rotary_dim))  # [D]
        self.register_buffer("inv_freq", per_dim, persistent=False)
        self.register_buffer("sign", torch.tensor([-1.0, 1.0]).repeat(head_dim // 2), persistent=False)  # [D]
        # YaRN's scale of the rotated dims' cos and sin; the dims past rotary_dim pass through as they are
        scale = None if yarn is None else F.pad(torch.full((rotary_dim,), yarn.attention_factor),
                                                (0, head_dim - rotary_dim), value=1.0)
        self.register_buffer("scale", scale, persistent=False)  # [D]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every token's angle at each dim of a head, [T, D] fp32 each, once per forward:
        the sin signed for the first of each pair (-sin, +sin), as `rotate` takes them. fp32 angles are
        exact enough at position 131,071 (positions are integers below 2^24)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D]
        if self.scale is None:
            return angles.cos(), angles.sin() * self.sign
        return angles.cos() * self.scale, angles.sin() * (self.sign * self.scale)

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Rotary":
        return cls(cfg.rotary_dim, cfg.rope_theta, cfg.head_dim, cfg.yarn)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] turned by Rotary's cos and signed sin [T, D], in fp32 whatever x's dtype. One
    expression per element, of x, its pair partner and the angle: compiled, one elementwise pass (the
    K/V store's producer), where slices put back together would be a kernel each. Past rotary_dim,
    x * 1 + partner * 0: x as it was."""
    x32 = x.float()
    partner = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # [T, heads, D]: x1, x0, x3, x2, ...
    # cos, sin [T, 1, D] against every head; x0 cos - x1 sin, x1 cos + x0 sin
    return (x32 * cos[:, None] + partner * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    """The projections around attention; attending itself is attention.py's (over the paged cache).
    Under tensor parallelism, this rank's heads only (shard.py)."""

    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = shard.heads(cfg), shard.kv_heads(cfg), cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # one fused projection, rows [q | k | v] (chatglm's layout; HF's split q/k/v are stacked on load)
        self.qkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D] (both rotated), v [T, Hkv, D]."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [T, (Hq + 2 Hkv) * D]
        qk = rotate(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), cos, sin)  # [T, Hq + Hkv, D]: q, k heads alike
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)  # [T, Hkv, D]
        return qk[:, :hq], qk[:, hq:], v


class SwiGLU(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2 F] -> silu(gate) * up [T, F]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU with one fused [gate | up] matrix (under tensor parallelism, this rank's part of its width)."""

    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        width = cfg.intermediate_size // shard.world
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * width, bias=False)
        self.act = SwiGLU()
        self.down = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, shard)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # checkpoints: post_attention_layernorm
        self.mlp = MLP(cfg, shard)
        self.sandwich = cfg.variant == "glm4"
        if self.sandwich:  # 0414: norm each branch's output before its residual add
            self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def before_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, H] (the residual stream) -> q, k, v of this layer's attention."""
        return self.attn.project(self.input_norm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, H] and the attention's output attn [T, Hq * D] -> the layer's output [T, H]."""
        h = self.attn.o(attn)
        x = x + (self.post_attn_norm(h) if self.sandwich else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.sandwich else h)

    def forward(self, x, cos, sin, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch):
        q, k, v = self.before_attention(x, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.attn.scale)  # [T, Hq, D]
        return self.after_attention(x, out.flatten(1))  # [T, Hq * D]


class GLM4Model(nn.Module):
    """shard: this process's part under tensor parallelism, whose partial sums and logits tp.py's hooks
    combine across the processes; the whole model by default."""

    def __init__(self, cfg: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        shard.check(cfg)
        self.cfg, self.shard = cfg, shard
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary.of(cfg)
        self.layers = nn.ModuleList(Layer(cfg, shard) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // shard.world, bias=False)  # untied

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device, quantization: str | dict | None = None,
              shard: Shard = Shard(), int4_group: int | None = None) -> GLM4Model:
        """The model with its weights allocated on `device` and not initialized (for the loader to fill):
        built on meta, so no weight is ever made twice. quantization: every linear's, or each linear's by module
        name (quant.quantize_linears); int4_group: inputs a scale (None: quant.INT4_GROUP)."""
        from .quant import INT4_GROUP, quantize_linears

        with torch.device("meta"):
            model = cls(cfg, shard).to(dtype)
            if quantization is not None:
                quantize_linears(model, quantization, int4_group=int4_group or INT4_GROUP)
        model = model.to_empty(device=device)
        model.rotary = Rotary.of(cfg).to(device)  # fp32 angles, not a weight
        return model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output rows x [N, H] -> next-token logits [N, V] in fp32."""
        return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] new tokens of all sequences, prefill spans first
        positions: torch.Tensor,  # [T]
        batch: AttentionBatch,
        kv: KVCache,
        logits_indices: torch.Tensor,  # [N] rows of T whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed(input_ids)  # [T, H]
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv.k[i], kv.v[i], batch)
        return self.logits(x.index_select(0, logits_indices))  # [N, V]: the norm is per row


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    """"auto": the checkpoint's own dtype when it is 16-bit, else float32 (a bf16 9B model in fp32
    would not fit a CPU box's memory)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    return DTYPES[cfg.torch_dtype] if cfg.torch_dtype in ("bfloat16", "float16") else torch.float32


def load_model(path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", progress=None,
               quantization: str | None = None, shard: Shard = Shard(), hf_overrides: dict | None = None) -> GLM4Model:
    """Build the model without initializing it (meta device), then fill it from the checkpoint.
    The model comes back plain (nn.Linear layers), or with every linear quantized while loading
    (quantization "int8" | "int4", quant.py; "gguf": each as the nearest of those to its block type in a GGUF
    file, loader.gguf_linear_schemes); how it runs fast is its runner's business. With a shard,
    this process's part of it (shard.py), read from the files alone. hf_overrides: keys of config.json
    replaced (ModelConfig.from_dir)."""
    from .gguf_blocks import INT4_CODES_GROUP
    from .gguf_file import forget_readers, holds_int4_codes, is_gguf, open_gguf
    from .loader import gguf_linear_schemes, load_weights  # the one place that knows checkpoint names

    cfg = ModelConfig.from_dir(path, hf_overrides)
    dtype = resolve_dtype(dtype, cfg)
    int4_group = None  # a GGUF file's 4-bit blocks are int4 groups of 32 already: kept, not re-quantized
    if quantization in ("int4", "gguf") and is_gguf(path) and holds_int4_codes(open_gguf(path)):
        int4_group = INT4_CODES_GROUP
    if quantization == "gguf":
        if not is_gguf(path):
            raise ValueError(f"quantization 'gguf' (each matrix as the nearest of int8 and int4 to its block type) "
                             f"is for GGUF files; {path} is not one")
        quantization = gguf_linear_schemes(path, cfg)
    model = GLM4Model.empty(cfg, dtype, device, quantization, shard, int4_group)
    load_weights(model, path, cfg, dtype=dtype, device=device, progress=progress, shard=shard)
    forget_readers()  # a GGUF file's: the tokenizer, read first, and the weights are all it was needed for
    return model.eval()
