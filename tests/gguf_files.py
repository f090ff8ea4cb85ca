"""Checkpoint folders written as GGUF files, the way llama.cpp's convert_hf_to_gguf.py writes GLM-4.

Independent of glm4serve's own name table: tensor names come from gguf-py's TensorNameMap (the converter's),
the metadata keys from GGUFWriter's methods, the tokenizer from tokenizer.json's vocabulary and merges padded
to the embedding's rows with [PAD{i}] tokens, as the converter's get_vocab_base does. Matrices take the type
asked for (quantized by gguf-py's numpy code, llama.cpp's formulas); norms and biases stay F32 as there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import gguf
from gguf import GGMLQuantizationType as T


def write_gguf(src: Path, out: Path, matrix_type: str = "F32", types: dict[str, str] | None = None,
               rope_scaling: dict | None = None) -> Path:
    """src: a safetensors checkpoint folder (chatglm or HF naming, glm or glm4); types: the type of the matrices
    of that GGUF name, or whose names end in "." and it, where not matrix_type (llama-quantize's mixes:
    {"output.weight": "Q6_K", "ffn_down.weight": "Q8_0"})."""
    config = json.loads((src / "config.json").read_text())
    chatglm = config["model_type"] == "chatglm"
    arch = gguf.MODEL_ARCH.GLM4 if config["model_type"] == "glm4" else gguf.MODEL_ARCH.CHATGLM
    layers = config["num_layers"] if chatglm else config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    _write_hparams(writer, config, chatglm, rope_scaling)
    _write_vocab(writer, src, config, glm4=arch == gguf.MODEL_ARCH.GLM4)
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith(".inv_freq"):
                    continue
                theirs = names.get_name(name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
                assert theirs is not None, name
                x = f.get_tensor(name).float().numpy()
                named = [t for end, t in (types or {}).items() if theirs == end or theirs.endswith("." + end)]
                kind = T[named[0] if named else matrix_type]
                if x.ndim == 1 or kind == T.F32:
                    writer.add_tensor(theirs, x.astype(np.float32))
                elif kind == T.IQ4_NL:
                    writer.add_tensor(theirs, iq4_nl_blocks(x), raw_dtype=kind)
                else:
                    writer.add_tensor(theirs, gguf.quants.quantize(x, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_hparams(writer, config: dict, chatglm: bool, rope_scaling: dict | None) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if chatglm:  # ChatGLMModel.set_gguf_parameters
        writer.add_context_length(config["seq_length"])
        writer.add_feed_forward_length(config["ffn_hidden_size"])
        writer.add_block_count(config["num_layers"])
        writer.add_head_count_kv(config["multi_query_group_num"])
        writer.add_layer_norm_rms_eps(config["layernorm_epsilon"])
        head_dim = config.get("kv_channels", hidden // heads)
        writer.add_rope_dimension_count(head_dim // 2)
        writer.add_rope_freq_base(10000 * config.get("rope_ratio", 1))
    else:  # TextModel.set_gguf_parameters, as Glm4Model inherits it (and as a -hf chatglm file would be, had
        # its converter read rope_theta and max_position_embeddings rather than chatglm's keys)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        head_dim = config.get("head_dim", hidden // heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 0.5)))
        writer.add_rope_freq_base(config["rope_theta"])
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_add_bos_token(False)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        writer.add_rope_scaling_factor(rope_scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope_scaling["original_max_position_embeddings"])


def _write_vocab(writer, src: Path, config: dict, glm4: bool) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab_size = config.get("padded_vocab_size", config.get("vocab_size"))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("glm4" if glm4 else "chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    writer.add_eos_token_id(ids["<|endoftext|>"])
    writer.add_eot_token_id(ids["<|user|>"])
    writer.add_unk_token_id(ids["<|endoftext|>"])
    template = src / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())


# IQ4_NL's 16 levels (llama.cpp's kvalues_iq4nl), uneven: no int4 group holds them as they stand
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def iq4_nl_blocks(x: np.ndarray) -> np.ndarray:
    """x [rows, cols] as IQ4_NL blocks (gguf-py has no quantizer for it): per 32 weights an fp16 scale d and each
    weight's nearest level, w = d * level, packed as Q4_0 packs its codes (weight j low, j + 16 high)."""
    blocks = x.reshape(-1, 32)
    d = (np.abs(blocks).max(1, keepdims=True) / 127).astype(np.float16)
    q = np.abs(blocks[..., None] / np.maximum(d, 1e-8)[..., None] - IQ4_NL_LEVELS).argmin(-1).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d.view(np.uint8), packed], axis=1).reshape(x.shape[0], -1)


def dequantized(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What a matrix becomes in a file of `kind` and back: the weights a GGUF model runs with."""
    data = x.float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, T[kind]), T[kind]))


def write_tiktoken_vocab_gguf(tokenizer_dir: Path, out: Path, vocab_size: int = 151552) -> Path:
    """THUDM's tokenizer.model (tiktoken ranks) and tokenizer_config.json's specials as a GGUF vocabulary, as
    llama.cpp's ChatGLM converter wrote glm-4-9b-chat's: each rank's bytes in GPT-2's byte-to-character map,
    its merges found by running BPE up to its own rank (more than two pieces where no pair reaches it), the
    specials CONTROL, [PAD{i}] up to the embedding's rows. Metadata only: no tensors."""
    import base64

    from glm4serve.model.tokenizer import bytes_to_unicode

    ranks = {}
    for line in (tokenizer_dir / "tokenizer.model").read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {int(i): t["content"] for i, t in
                json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    to_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    def pieces(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                     if ranks.get(a + b, max_rank) < max_rank]
            if not found:
                return parts
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    by_rank = {r: t for t, r in ranks.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_rank:
            tokens.append(text(by_rank[i]))
            types.append(gguf.TokenType.NORMAL)
        elif i in specials:
            tokens.append(specials[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [" ".join(map(text, pieces(t, r))) for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    writer = gguf.GGUFWriter(out, "chatglm")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
