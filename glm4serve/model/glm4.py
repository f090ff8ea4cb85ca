"""GLM-4 in plain PyTorch, top to bottom: norm, rotary, attention, MLP, layer, model.

Covers both math variants: `glm` (glm-4-9b-chat, chatglm and -hf checkpoints) and `glm4`
(0414 / Z1: extra norms on the attention and MLP outputs). Inputs are a flat batch of new tokens
of many sequences; K/V live in the paged cache (see attention.py). Parameter names are ours;
loader.py holds the one table that maps checkpoint names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_decode
from .attention import AttentionBatch, paged_attention
from .config import ModelConfig
from .cpu_linear import pack_linears
from .kv_cache import KVCache


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


class Rotary(nn.Module):
    """Partial, interleaved (GPT-J style) RoPE: only the first `rotary_dim` dims of each head rotate,
    in pairs (x0, x1), (x2, x3), ...; the rest pass through. A pair is a complex number x0 + i*x1,
    and rotating it by the angle p * inv_freq is a multiplication by e^(i * angle)."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary_dim / 2]
        self.rotary_dim = rotary_dim

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """e^(i * position * inv_freq): [T, rotary_dim / 2] complex64, computed once per forward.
        fp32 angles are exact enough at position 131,071 (positions are integers below 2^24)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, rotary_dim / 2]
        return torch.polar(torch.ones_like(freqs), freqs)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] in place (it may be a view into the fused qkv output)."""
        pairs = x[..., : self.rotary_dim].unflatten(-1, (-1, 2))  # [T, heads, rotary_dim / 2, 2], a view
        rotated = torch.view_as_complex(pairs.float()) * rot[:, None, :]  # [T, heads, rotary_dim / 2]
        pairs.copy_(torch.view_as_real(rotated))  # fp32 math, stored back in the model's dtype
        return x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # one fused projection, rows [q | k | v] (chatglm's layout; HF's split q/k/v are stacked on load)
        self.qkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x, rot, rotary: Rotary, k_cache, v_cache, batch: AttentionBatch):
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [T, (Hq + 2 Hkv) * D]
        qk = rotary(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), rot)  # q and k heads rotate alike
        q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)  # [T, Hkv, D]
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale)  # [T, Hq, D]
        return self.o(out.view(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU with one fused [gate | up] matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # checkpoints: post_attention_layernorm
        self.mlp = MLP(cfg)
        self.sandwich = cfg.variant == "glm4"
        if self.sandwich:  # 0414: norm each branch's output before its residual add
            self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rot, rotary, k_cache, v_cache, batch):
        h = self.attn(self.input_norm(x), rot, rotary, k_cache, v_cache, batch)
        x = x + (self.post_attn_norm(h) if self.sandwich else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.sandwich else h)


class GLM4Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied
        self.one_token = None  # fp32 on CPU: the step compiled for one decoding sequence (cpu_decode.py)

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
        rot = self.rotary.angles(positions)  # [T, rotary_dim / 2] complex
        if self.one_token is not None and x.shape[0] == 1 and logits_indices.shape[0] == 1:
            return self.one_token(x, rot, kv, batch)  # [1, V]
        for i, layer in enumerate(self.layers):
            x = layer(x, rot, self.rotary, kv.k[i], kv.v[i], batch)
        x = self.norm(x.index_select(0, logits_indices))  # [N, H]: the norm is per row
        return self.lm_head(x).float()  # [N, V]


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: str | torch.device) -> torch.dtype:
    """"auto": the checkpoint's own dtype on GPUs; float32 on CPU unless the weights are 16-bit
    (a bf16 9B model in fp32 would not fit a CPU box's memory)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    saved = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.torch_dtype or "", torch.float32)
    return saved


def load_model(
    path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", progress=None, pack: bool = True,
    kv_block_size: int = 16,
) -> GLM4Model:
    """Build the model without initializing it (meta device), then fill it from the checkpoint.
    pack: fp32 linears on CPU get oneDNN-packed weights (cpu_linear.py), 2-3x faster decode; on a
    model over 64 MiB the layers are also compiled for one decoding sequence (cpu_decode.py), for
    a KV cache of `kv_block_size`-token blocks."""
    from .loader import load_weights  # the one place that knows checkpoint names

    cfg = ModelConfig.from_dir(path)
    dtype = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        model = GLM4Model(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta).to(device)  # fp32 buffer, not a weight
    load_weights(model, path, cfg, dtype=dtype, device=device, progress=progress)
    if pack:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        compile_layers = weight_bytes > cpu_decode.COMPILED_DECODE_MIN_BYTES
        packed = pack_linears(model, plain_for=cpu_decode.LINEARS if compile_layers else ())
        if packed and compile_layers:  # packed: fp32 on CPU
            model.one_token = cpu_decode.compile_one_token_layers(model, kv_block_size)
    return model.eval()
