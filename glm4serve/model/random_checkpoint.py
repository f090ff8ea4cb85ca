"""Small GLM-4 checkpoints with seeded random weights, written the way the real ones are on disk.

Weights are generated in *our* naming, each tensor from its own generator seeded by (seed, our
name), then mapped to the checkpoint naming with loader.checkpoint_tensors. So one seed gives
the same weights in every layout, config style and sharding, whatever order they are written in,
and "chatglm and HF checkpoints give the same logits" is a meaningful test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import struct
import sys
import zlib
from pathlib import Path

import torch

from .config import (CHAT_ROPE_THETA, DTYPES, GLM4_RMS_NORM_EPS, LAYOUTS, MAX_POSITIONS, ROPE_BASE, VARIANTS,
                     ModelConfig)
from .loader import INDEX_FILE, SINGLE_FILE, CheckpointTensor, checkpoint_tensors, param_shapes
from .lora import LORA_TARGETS
from .tokenizer import GLM4_STOP_TOKENS

_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# glm-4-9b-chat's shapes (its config.json), for benchmark checkpoints of the real size or a slice of it
GLM4_9B_CHAT = dict(variant="glm", vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40,
                    num_heads=32, num_kv_heads=2, head_dim=128, max_position_embeddings=MAX_POSITIONS,
                    rope_theta=CHAT_ROPE_THETA)


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    variant: str = "glm",
    layout: str = "hf",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = MAX_POSITIONS,
    rope_theta: float = CHAT_ROPE_THETA,  # with the 128K context: glm-4-9b-chat's, not the -hf config's slip
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    config_style: str = "4.x",
    init_std: float = 0.02,
    num_merges: int = 2000,
) -> Path:
    """Write config.json, generation_config.json, a small tokenizer and random weights into out_dir."""
    from .small_tokenizer import write_small_tokenizer  # the tokenizer helper's module

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "chatglm" and variant != "glm":
        raise ValueError("the chatglm layout exists for the glm variant only (glm4 / 0414 checkpoints are HF)")
    if config_style not in ("4.x", "5.x"):
        raise ValueError(f"unknown config_style {config_style!r}; expected '4.x' or '5.x'")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    head_dim = head_dim or hidden_size // num_heads

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_token_ids = write_small_tokenizer(out, num_merges=num_merges, seed=seed)
    if vocab_size is None:
        vocab_size = -(-num_token_ids // 64) * 64  # padded like padded_vocab_size
    if vocab_size < num_token_ids:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {num_token_ids} token ids")
    special = special_token_ids(out)
    eos_ids = [special[t] for t in GLM4_STOP_TOKENS]
    pad_id = special["<|endoftext|>"]

    sizes = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
    )  # fmt: skip
    if layout == "chatglm":
        config = _chatglm_config(**sizes, dtype=dtype, eos_ids=eos_ids, pad_id=pad_id)
    else:
        config = _hf_config(variant, config_style, **sizes, dtype=dtype, eos_ids=eos_ids, pad_id=pad_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.8,
        "max_length": max_position_embeddings,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    cfg = ModelConfig.from_dir(out)  # read back: the weights follow what the config says
    _write_weights(out, cfg, DTYPES[dtype], seed, shards, init_std)
    return out


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """Added (special) tokens -> ids, from tokenizer.json or else tokenizer_config.json."""
    d = Path(tokenizer_dir)
    ids: dict[str, int] = {}
    if (d / "tokenizer.json").is_file():
        for tok in json.loads((d / "tokenizer.json").read_text()).get("added_tokens", []):
            ids[tok["content"]] = int(tok["id"])
    if not ids and (d / "tokenizer_config.json").is_file():
        decoder = json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        ids = {tok["content"]: int(i) for i, tok in decoder.items()}
    missing = [t for t in GLM4_STOP_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"tokenizer in {d} lacks the GLM-4 special tokens {missing}")
    return ids


def _chatglm_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
                    head_dim, max_position_embeddings, rope_theta, dtype, eos_ids, pad_id) -> dict:  # fmt: skip
    # Keys as in THUDM/glm-4-9b-chat's config.json (minus auto_map: there is no remote code here).
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "ffn_hidden_size": intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden_size,
        "kv_channels": head_dim,
        "layernorm_epsilon": GLM4_RMS_NORM_EPS,
        "multi_query_attention": True,
        "multi_query_group_num": num_kv_heads,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_layers": num_layers,
        "rope_ratio": rope_theta / ROPE_BASE,
        "original_rope": True,
        "padded_vocab_size": vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": max_position_embeddings,
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": "4.44.0",
        "tie_word_embeddings": False,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
    }


def _hf_config(variant, style, *, vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
               num_kv_heads, head_dim, max_position_embeddings, rope_theta, dtype, eos_ids, pad_id) -> dict:  # fmt: skip
    config = {
        "architectures": ["GlmForCausalLM" if variant == "glm" else "Glm4ForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": eos_ids,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": variant,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": pad_id,
        "rms_norm_eps": GLM4_RMS_NORM_EPS,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if style == "4.x":  # as transformers 4.x saved them (glm-4-9b-chat-hf, GLM-4-9B-0414)
        config.update(partial_rotary_factor=0.5, rope_theta=rope_theta, torch_dtype=dtype,
                      transformers_version="4.51.3")  # fmt: skip
    else:  # as transformers 5.x saves them
        config.update(rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
                      dtype=dtype, transformers_version="5.0.0")  # fmt: skip
    return dict(sorted(config.items()))


def write_random_adapter(out_dir: str | Path, model_dir: str | Path, *, layout: str | None = None, rank: int = 4,
                         alpha: float = 8.0, targets: tuple[str, ...] = LORA_TARGETS, seed: int = 1,
                         init_std: float = 0.05) -> Path:
    """A random LoRA adapter for the checkpoint in model_dir, in PEFT's files and naming (lora.py), its
    tensors named as `layout` names the base weights (default: the checkpoint's own layout). PEFT starts
    B at zero; here both are random, so that the adapter changes the model."""
    from dataclasses import replace

    from safetensors.torch import save_file

    cfg = ModelConfig.from_dir(model_dir)
    cfg = replace(cfg, layout=layout or cfg.layout)
    tensors = {}
    for name, spec in checkpoint_tensors(cfg).items():
        module = spec.target.removesuffix(".weight")
        if not name.endswith(".weight") or module.split(".", 2)[-1] not in targets:
            continue
        stem = "base_model.model." + name.removesuffix(".weight")
        rows, in_features = spec.shape
        tensors[stem + ".lora_A.weight"] = random_tensor(stem + "A", (rank, in_features), seed, init_std)
        tensors[stem + ".lora_B.weight"] = random_tensor(stem + "B", (rows, rank), seed, init_std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    modules = sorted({n.split(".")[-3] for n in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": str(model_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def random_tensor(our_name: str, shape: tuple[int, ...], seed: int, init_std: float) -> torch.Tensor:
    """The float32 value of one of our parameters: a function of (seed, name, shape) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(our_name.encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if our_name.endswith("norm.weight"):
        return x.mul_(0.1).add_(1.0)  # around 1 but not 1: swapping two norms changes the output
    if our_name.endswith(".bias"):
        return x.mul_(0.1)
    return x.mul_(init_std)  # in place: the embedding of a benchmark-size model is 300 MB


def _write_weights(out: Path, cfg: ModelConfig, dtype: torch.dtype, seed: int, shards: int, init_std: float):
    tensors = list(checkpoint_tensors(cfg).values())
    groups = _split_by_bytes(tensors, shards, dtype.itemsize)
    files = [SINGLE_FILE] if shards == 1 else [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    extra: dict[str, torch.Tensor] = {}
    if cfg.layout == "chatglm":
        # THUDM's checkpoints store RotaryEmbedding(head_dim // 2).inv_freq, base 10000 (rope_ratio is
        # applied at run time); the loader ignores it, but the real files have it, so ours do too.
        dim = cfg.head_dim // 2
        extra["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)

    shapes = param_shapes(cfg)
    last: dict[str, torch.Tensor] = {}  # our last full tensor: HF q, k, v are three row blocks of one qkv

    def value(spec: CheckpointTensor) -> torch.Tensor:
        if spec.target not in last:
            last.clear()
            last[spec.target] = random_tensor(spec.target, shapes[spec.target], seed, init_std)
        full = last[spec.target]
        return (full if spec.rows is None else full[spec.rows[0] : spec.rows[1]]).to(dtype)

    weight_map: dict[str, str] = {}
    total = 0
    for k, (f, group) in enumerate(zip(files, groups)):
        items = [(s.name, s.shape, lambda s=s: value(s)) for s in group]
        if k == 0:
            items += [(n, tuple(t.shape), lambda t=t: t.to(dtype)) for n, t in extra.items()]
        total += _stream_safetensors(out / f, items, dtype)
        weight_map.update({name: f for name, _, _ in items})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _split_by_bytes(tensors: list[CheckpointTensor], shards: int, itemsize: int) -> list[list[CheckpointTensor]]:
    """Contiguous groups of about equal size, none empty (as long as there are enough tensors)."""
    if shards > len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} shards")
    sizes = [math.prod(t.shape) * itemsize for t in tensors]
    target = sum(sizes) / shards
    groups: list[list[CheckpointTensor]] = [[]]
    done = 0
    for i, (t, size) in enumerate(zip(tensors, sizes)):
        left_tensors, left_groups = len(tensors) - i, shards - len(groups)
        if groups[-1] and left_groups and (done >= target * len(groups) or left_tensors <= left_groups):
            groups.append([])
        groups[-1].append(t)
        done += size
    return groups


def _stream_safetensors(path: Path, items: list, dtype: torch.dtype) -> int:
    """Write a safetensors file tensor by tensor (safetensors.save_file wants them all in memory).

    items: (name, shape, make) with make() -> tensor of that shape in `dtype`. Returns data bytes.
    Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian data in header order, contiguous.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in items:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so the data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, make in items:
            t = make()
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, name
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy())  # no bytes copy of the tensor
    return offset


def make_model_main(argv: list[str]) -> int:
    """`glm4serve make-model DIR ...`: write a random GLM-4 checkpoint for tests and benchmarks.
    A flag per keyword of write_random_checkpoint, with its default."""
    p = argparse.ArgumentParser(prog="glm4serve make-model", description=make_model_main.__doc__)
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--like", choices=["glm-4-9b-chat"], help="start from this model's shapes (the flags below "
                   "still apply: e.g. --num-layers 2 for a slice); random weights all the same")
    choices = {"variant": ["glm", "glm4"], "layout": ["hf", "chatglm"], "dtype": sorted(DTYPES),
               "config_style": ["4.x", "5.x"]}
    aliases = {"num_layers": ["--layers"], "num_heads": ["--heads"], "num_kv_heads": ["--kv-heads"]}
    for name, param in inspect.signature(write_random_checkpoint).parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        default = param.default
        kind = str if name in choices else (int if default is None else type(default))  # None: an int or "derive"
        p.add_argument("--" + name.replace("_", "-"), *aliases.get(name, []), dest=name, type=kind,
                       default=argparse.SUPPRESS, choices=choices.get(name),
                       help=f"default: {'derived' if default is None else default}")
    a = vars(p.parse_args(argv))
    a = {**(GLM4_9B_CHAT if a.pop("like", None) else {}), **a}
    try:
        out = write_random_checkpoint(a.pop("dir"), **a)
    except ValueError as e:
        print(f"make-model: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
