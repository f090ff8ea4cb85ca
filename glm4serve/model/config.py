"""GLM-4 model configuration, read from a checkpoint's config.json in any of its three styles.

- chatglm style (`model_type: chatglm`, THUDM glm-4-9b-chat and friends),
- HF `glm` (glm-4-9b-chat-hf) and HF `glm4` (0414 / Z1), as transformers 4.x wrote them
  (`rope_theta`, `partial_rotary_factor` at top level) or as 5.x writes them (`rope_parameters`).

A GGUF file's metadata is read as the HF config it stands for (gguf_file.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by config name
GLM4_RMS_NORM_EPS = 1.5625e-7  # glm-4-9b-chat's value
VARIANTS = ("glm", "glm4")  # glm4 = 0414 math: two extra norms per layer
LAYOUTS = ("chatglm", "hf", "gguf")  # weight naming of the checkpoint on disk
ROPE_BASE = 10000.0  # chatglm's RoPE base is this times rope_ratio; transformers' rope_theta default
MAX_POSITIONS = 131072  # GLM-4's context, transformers' max_position_embeddings default
CHAT_ROPE_THETA = 5e6  # glm-4-9b-chat's trained RoPE base (rope_ratio 500)

log = logging.getLogger("glm4serve.model")


class ConfigError(ValueError):
    """config.json is missing, unreadable or describes something that is not GLM-4."""


@dataclass(frozen=True)
class Yarn:
    """YaRN's stretch of RoPE past the trained context (transformers' `rope_type: yarn`), which GLM-4-0414's
    model card advises beyond 32K: the slow pairs' frequencies divided by `factor`, the fast ones kept, a linear
    ramp between the pairs that turn `beta_fast` and `beta_slow` times over the trained context; cos and sin
    scaled by `attention_factor`."""

    factor: float
    original_max_positions: int  # the context it was trained at
    attention_factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # the ramp's ends rounded out to whole pairs

    @classmethod
    def from_dict(cls, d: dict, max_positions: int) -> "Yarn":
        """From a config's rope parameters, with transformers' defaults for the keys left out."""
        original = d.get("original_max_position_embeddings") or max_positions
        factor = d.get("factor") or max_positions / original

        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention = d.get("attention_factor")
        if attention is None:
            m, m_all = d.get("mscale"), d.get("mscale_all_dim")
            attention = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
        return cls(float(factor), int(original), float(attention), float(d.get("beta_fast") or 32),
                   float(d.get("beta_slow") or 1), bool(d.get("truncate", True)))

    @property
    def max_positions(self) -> int:
        """The context it stretches to (vLLM's: the trained context times the factor)."""
        return int(self.original_max_positions * self.factor)


@dataclass(frozen=True)
class ModelConfig:
    variant: str  # "glm" | "glm4"
    layout: str  # "chatglm" | "hf"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = GLM4_RMS_NORM_EPS
    max_position_embeddings: int = MAX_POSITIONS
    attention_bias: bool = True
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in ("bfloat16", ...)
    yarn: Yarn | None = None  # RoPE stretched by YaRN; None: plain RoPE
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown GLM-4 variant {self.variant!r}; expected one of {VARIANTS}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown checkpoint layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the rest pass through): 64 of 128 for GLM-4."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        method, bits = d.get("quantization_config"), d.get("quantization_bit")  # transformers' and chatglm's
        if method or bits:
            name = method.get("quant_method", "quantization_config") if method else f"chatglm int{bits}"
            raise ConfigError(
                f"the checkpoint's weights are stored quantized ({name}), which glm4serve does not load: "
                "serve the bfloat16 checkpoint, which --quantization int8 or int4 quantizes at load on CPU")
        try:
            if model_type == "chatglm":
                return cls._from_chatglm(d)
            if model_type in VARIANTS:  # transformers' model_type names the variant
                return cls._from_hf(d, model_type)
        except KeyError as e:
            raise ConfigError(f"config.json of model_type {model_type!r} lacks the key {e.args[0]!r}") from None
        raise ConfigError(
            f"unsupported model_type {model_type!r}: glm4serve serves GLM-4 checkpoints "
            "(model_type 'chatglm', 'glm' or 'glm4')"
        )

    @classmethod
    def from_dir(cls, path: str | Path, overrides: dict | None = None) -> "ModelConfig":
        """The config of a checkpoint folder, or of a GGUF file (its metadata, read as the config.json it stands
        for). overrides: keys of config.json replaced, as vLLM's --hf-overrides (`rope_scaling` for YaRN, say)."""
        from .gguf_file import gguf_config_dict, is_gguf, open_gguf

        if is_gguf(path):
            d = gguf_config_dict(open_gguf(path), frozenset(overrides or ()))
            return replace(cls.from_dict({**d, **(overrides or {})}), layout="gguf")
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON: {e}") from None
        return cls.from_dict({**d, **(overrides or {})})

    @classmethod
    def _from_chatglm(cls, d: dict) -> "ModelConfig":
        if d.get("rope_scaling") or d.get("rope_parameters"):
            raise ConfigError("a chatglm config's RoPE is its rope_ratio: rope_scaling and rope_parameters are read "
                              "from HF-layout configs (model_type glm or glm4) only")
        num_heads = d["num_attention_heads"]
        head_dim = d.get("kv_channels") or d["hidden_size"] // num_heads
        multi_query = d.get("multi_query_attention", True)
        return cls(
            variant="glm",
            layout="chatglm",
            vocab_size=d["padded_vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["ffn_hidden_size"],
            num_layers=d["num_layers"],
            num_heads=num_heads,
            num_kv_heads=d["multi_query_group_num"] if multi_query else num_heads,
            head_dim=head_dim,
            # THUDM's RotaryEmbedding: base 10000 * rope_ratio over half of each head.
            rope_theta=ROPE_BASE * float(d.get("rope_ratio", 1)),
            partial_rotary_factor=0.5,
            rms_norm_eps=d.get("layernorm_epsilon", 1e-5),
            max_position_embeddings=d.get("seq_length", 8192),
            attention_bias=d.get("add_qkv_bias", True),
            eos_token_ids=_as_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra=d,
        )

    @classmethod
    def _from_hf(cls, d: dict, model_type: str) -> "ModelConfig":
        num_heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or {}  # transformers 5.x
        theta = rope.get("rope_theta", d.get("rope_theta", ROPE_BASE))
        factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        scaling = d.get("rope_scaling") or {}  # "type" is the older key, as in GLM-4-0414's YaRN advice
        rope_types = {rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
        if rope_types - {"yarn"}:
            raise ConfigError(f"rope type {min(rope_types - {'yarn'})!r} is not supported (only default RoPE and "
                              "yarn)")
        max_positions = d.get("max_position_embeddings", MAX_POSITIONS)
        if model_type == "glm" and float(theta) == ROPE_BASE and max_positions == MAX_POSITIONS:
            _warn_of_the_hf_conversion(d, rope)
        yarn = None
        if rope_types:  # transformers 5.x keeps the stretch's keys in rope_parameters, 4.x in rope_scaling
            yarn = Yarn.from_dict(rope if rope.get("rope_type") == "yarn" else scaling, max_positions)
        return cls(
            variant=model_type,
            layout="hf",
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            # missing keys take transformers' GlmConfig / Glm4Config defaults, as transformers would load them
            num_kv_heads=d.get("num_key_value_heads", 2),
            head_dim=d.get("head_dim", 128),
            rope_theta=float(theta),
            partial_rotary_factor=float(factor),
            rms_norm_eps=d.get("rms_norm_eps", GLM4_RMS_NORM_EPS),
            max_position_embeddings=yarn.max_positions if yarn else max_positions,
            attention_bias=d.get("attention_bias", True),
            eos_token_ids=_as_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            yarn=yarn,
            extra=d,
        )


def _warn_of_the_hf_conversion(d: dict, rope: dict) -> None:
    """glm-4-9b-chat-hf's published config carries rope_theta 10000 from a conversion bug: the 128K chat model was
    trained at 5e6. Served as the config says, as transformers runs it; the override that fixes it is named."""
    fix = {"rope_parameters": {**rope, "rope_theta": CHAT_ROPE_THETA}} if rope else {"rope_theta": CHAT_ROPE_THETA}
    log.warning("this glm checkpoint's config has rope_theta %g with a context of %d: glm-4-9b-chat-hf's published "
                "config carries that from a conversion bug, and the chat model was trained at %g. If this is that "
                "checkpoint, serve it with --hf-overrides '%s'", ROPE_BASE, d.get("max_position_embeddings",
                                                                                 MAX_POSITIONS),
                CHAT_ROPE_THETA, json.dumps(fix))


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)
