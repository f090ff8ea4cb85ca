"""GLM-4 in one GGUF file (llama.cpp's format): its config, its tokenizer and its weights.

llama.cpp's converter writes glm-4-9b-chat (and its -hf twin) as architecture `chatglm` and GLM-4-0414
as `glm4`; the file holds the hyperparameters as metadata, the tokenizer as a token list with merges, and
each weight in its own type (F32, F16, BF16, or blocks like Q8_0, Q4_0, Q4_K, Q6_K). Reading it:

  - the metadata becomes the config.json that transformers would have (`gguf_config_dict`), so
    ModelConfig, --hf-overrides and everything after them read a GGUF checkpoint as any other;
  - the vocabulary becomes GLM-4's tiktoken ranks again (`gguf_tokenizer`), run as THUDM's tokenizer.model;
  - each weight is widened to float (exactly: llama.cpp's formulas, in torch for the common block types,
    gguf_blocks.py, else gguf's numpy code) as the loader reads it (`GGUFWeights`), a few MB of rows at a
    time, then copied into the model or quantized by our linears as any weight is.

On a CPU the server serves each of a file's matrices in the one of our quantizations nearest to its block type
(`nearest_scheme`), unless told otherwise: llama-quantize's mixes (Q4_K_M: Q4_K, with Q5_0, Q6_K and Q8_0
where it keeps more bits) stay mixed. Q4_0, Q4_1 and Q4_K blocks are int4 groups of 32 of ours as they stand
(`holds_int4_codes`, gguf_blocks.int4_codes): those are kept, codes, scales and zeros. Other block types, which
we have no kernels for, are widened and re-quantized.
The names are mapped in loader.WEIGHT_NAMES with every other checkpoint format.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .config import CHAT_ROPE_THETA, GLM4_RMS_NORM_EPS, MAX_POSITIONS
from .gguf_blocks import BLOCK_TYPES, INT4_CODES, int4_codes, widen

log = logging.getLogger("glm4serve.model")

GGUF_SUFFIX = ".gguf"
ARCHITECTURES = {"chatglm": "glm", "glm4": "glm4"}  # GGUF's general.architecture -> our variant
# llama.cpp's token types (gguf.TokenType): NORMAL tokens are BPE pieces, CONTROL ones are specials,
# USER_DEFINED ones added text; UNUSED ones pad the vocabulary to the embedding's rows.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# pre-tokenizers (tokenizer.ggml.pre) that split text with GLM-4's pattern (tokenizer.GLM4_SPLIT_PATTERN)
GLM4_PRE_TOKENIZERS = ("chatglm-bpe", "glm4")
# what glm-4-9b-chat's config says, where a file converted from its -hf twin lost it
GLM4_9B_CHAT_FIX = {"max_position_embeddings": MAX_POSITIONS, "rope_theta": CHAT_ROPE_THETA,
                    "rms_norm_eps": GLM4_RMS_NORM_EPS}


class GGUFError(ValueError):
    """The file is not a GGUF file of a GLM-4 model we can read."""


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() == GGUF_SUFFIX


def open_gguf(path: str | Path):
    """The file's reader (gguf.GGUFReader: metadata parsed, tensors located, nothing read yet). Kept for the
    last file opened until forget_readers(): parsing the header (151,552 tokens) takes seconds, and a load asks
    for it four times."""
    path = Path(path).resolve()
    stat = path.stat()
    return _reader(path, stat.st_mtime_ns, stat.st_size)


def forget_readers() -> None:
    """Drop the kept reader (its parsed header holds ~300 MB for a 151,552-token vocabulary): once loaded, the
    model needs nothing more of the file."""
    _reader.cache_clear()


@functools.lru_cache(maxsize=1)
def _reader(path: Path, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # a short file or another format fails in numpy's view of the header
        raise GGUFError(f"{path} is truncated or not a GGUF file ({type(e).__name__}: {e})") from None


def _value(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def architecture(reader) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not GLM-4's: glm4serve serves "
                        f"{' and '.join(map(repr, ARCHITECTURES))} files (glm-4-9b-chat, GLM-4-0414)")
    return arch


def _tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in torch's order (GGUF lists the innermost dimension first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def gguf_config_dict(reader, overridden: frozenset[str] = frozenset()) -> dict:
    """The config.json (transformers' glm or glm4 keys) the file's metadata describes; overridden: keys the
    user's --hf-overrides replace (a context set there needs no warning about the file's)."""
    arch = architecture(reader)
    shapes = _tensor_shapes(reader)

    def key(name: str, default=None):
        value = _value(reader, f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"the GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if "token_embd.weight" not in shapes:
        raise GGUFError("the GGUF file has no token_embd.weight")
    d = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "partial_rotary_factor": int(key("rope.dimension_count", head_dim)) / head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "attention_bias": any(n.startswith("blk.0.attn_") and n.endswith(".bias") for n in shapes),
        "torch_dtype": _checkpoint_dtype(reader),
    }
    if arch == "chatglm" and d["max_position_embeddings"] == hidden and "max_position_embeddings" not in overridden:
        log.warning(
            "this GGUF file's context is %d tokens, its hidden size: llama.cpp's converter writes that for a "
            "checkpoint whose config has no seq_length (glm-4-9b-chat-hf), with a RoPE base of 10000 and an RMS "
            "norm eps of 1e-5 where it has no rope_ratio and layernorm_epsilon. Served as the file says, as "
            "llama.cpp runs it; if this is glm-4-9b-chat, serve it with --hf-overrides '%s'", hidden,
            json.dumps(GLM4_9B_CHAT_FIX))
    scaling = _value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):  # ModelConfig refuses any but yarn, by name
        d["rope_scaling"] = {"type": scaling, "factor": float(key("rope.scaling.factor")),
                             "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
    return d


def _checkpoint_dtype(reader) -> str:
    """The dtype a checkpoint of these weights is served in by default (--dtype auto): float32 or float16 where
    every matrix is stored so, else bfloat16 (BF16 itself, and what block types widen to)."""
    from gguf import GGMLQuantizationType as T

    types = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    return {frozenset({T.F32}): "float32", frozenset({T.F16}): "float16"}.get(frozenset(types), "bfloat16")


def nearest_scheme(tensor_type) -> str | None:
    """Ours nearest to one block type: int8 for more than 5 bits a weight, scales counted (Q8_0, Q6_K, Q5_0,
    Q5_K), int4 below (Q4_0, Q4_1, Q4_K, Q3_K ...); None for floats (F32, F16, BF16: served in --dtype)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if tensor_type in (T.F32, T.F16, T.BF16):
        return None
    block, size = GGML_QUANT_SIZES[tensor_type]
    return "int8" if size * 8 / block > 5 else "int4"


def quantized_types(reader) -> dict[str, str]:
    """The block types among the file's matrices, each with the nearest of ours (nearest_scheme); {} for floats."""
    types = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    return {t.name: nearest_scheme(t) for t in sorted(types) if nearest_scheme(t) is not None}


def holds_int4_codes(reader) -> bool:
    """Whether most of the layers' matrices are of a 4-bit type (Q4_0, Q4_1, Q4_K) that is int4 in groups of 32
    as it stands: served as int4, its codes and scales are kept (gguf_blocks.INT4_CODES), not re-quantized."""
    kinds = [t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 2 * sum(k in INT4_CODES for k in kinds) > len(kinds)


def weight_types(reader) -> str:
    """The block types of the file's matrices with their counts, for a log line ("Q4_0 x280, Q6_K x1")."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


class GGUFWeights:
    """The file's tensors by name, as a safetensors file's `get_slice` gives them: rows read and widened to float
    when indexed (the loader reads a few MB at a time: whole matrices widened at once were 5-15x slower, their
    temporaries fresh memory for every one, and held GBs). Read inside `with`, which holds the file open."""

    def __init__(self, path: str | Path):
        reader = open_gguf(path)
        self.path = Path(path)
        self.tensors = {t.name: t for t in reader.tensors}
        self.shapes = _tensor_shapes(reader)
        self.file = None  # read as a file, not through the reader's mapping: pages of a mapping the process
        # touched count in its resident memory until it goes (the whole file, by the end of a load)

    def __enter__(self) -> "GGUFWeights":
        self.file = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.file = None

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str) -> "GGUFTensor":
        return GGUFTensor(self.tensors[name], self.shapes[name], self.file)


class GGUFTensor:
    def __init__(self, tensor, shape: tuple[int, ...], file):
        self.tensor, self.shape, self.file = tensor, shape, file

    def _bytes(self, rows: slice = slice(None)) -> np.ndarray:
        """The stored bytes of these rows (all of a vector's), shaped as the reader's view of them."""
        t = self.tensor
        n_rows = t.data.shape[0]
        start, stop, _ = rows.indices(n_rows)
        row_bytes = t.n_bytes // n_rows
        buf = bytearray(max(0, stop - start) * row_bytes)
        self.file.seek(t.data_offset + start * row_bytes)
        if self.file.readinto(buf) != len(buf):
            raise GGUFError(f"{self.file.name} ends inside tensor {t.name}: truncated")
        return np.frombuffer(buf, dtype=t.data.dtype).reshape(-1, *t.data.shape[1:])

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key) -> torch.Tensor:
        """t[a:b] or t[a:b, c:d] (rows first: stored rows are runs of blocks), as float32, bfloat16 or float16."""
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if len(self.shape) == 1:  # a vector's blocks (if any) run across the rows asked for: widened whole
            return self._widen(self._bytes()).reshape(-1)[rows]
        return self._widen(self._bytes(rows))[:, cols]

    @property
    def kind(self) -> str:
        return self.tensor.tensor_type.name

    def codes(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """These rows of a matrix of a 4-bit type of gguf_blocks.INT4_CODES as int4 codes, scales and zeros."""
        return int4_codes(torch.from_numpy(self._bytes(rows)), self.kind)

    def _widen(self, data: np.ndarray) -> torch.Tensor:
        from gguf import GGMLQuantizationType as T
        from gguf import quants

        kind = self.tensor.tensor_type
        if kind in (T.F32, T.F16):
            return torch.from_numpy(data)
        if kind == T.BF16:  # bytes, two an element: reinterpreted, not converted
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        if kind.name in BLOCK_TYPES:
            return widen(torch.from_numpy(data), kind.name)
        try:
            return torch.from_numpy(quants.dequantize(data, kind))
        except NotImplementedError:
            raise GGUFError(f"tensor {self.tensor.name} is {kind.name}, a type gguf cannot dequantize") from None


def gguf_tokenizer(reader) -> tuple[dict[bytes, int], dict[int, tuple[str, bool]], str | None]:
    """The file's vocabulary as GLM-4's tokenizer takes it (tokenizer.tiktoken_tokenizer): BPE ranks (a token's
    bytes -> its id), added tokens {id: (text, special)}, and the chat template (None if it has none).

    GLM-4's own tokenizer is tiktoken's BPE over ranks, and llama.cpp's converter writes each rank's bytes (in
    GPT-2's byte-to-character map) at its id, with merges derived from the ranks. Those merges cannot say every
    rank: a token two merges reach in more than one way, or none (written as a merge of three pieces), makes a
    BPE run by merges split text that tiktoken keeps whole. So the ranks are read back and run as tiktoken
    does, and the merges are not needed."""
    from .tokenizer import bytes_to_unicode

    model, pre = _value(reader, "tokenizer.ggml.model"), _value(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in GLM4_PRE_TOKENIZERS:
        raise GGUFError(f"the GGUF tokenizer is {model!r} with pre-tokenizer {pre!r}; glm4serve reads GLM-4's "
                        f"('gpt2' with one of {GLM4_PRE_TOKENIZERS})")
    tokens, types = _value(reader, "tokenizer.ggml.tokens"), _value(reader, "tokenizer.ggml.token_type")
    if not tokens or len(types) != len(tokens):
        raise GGUFError("the GGUF tokenizer lacks its tokens or their types")
    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    ranks, added, normal = {}, {}, 0
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL:
            normal += 1
            try:
                ranks[bytes(byte_of_char[c] for c in token)] = i
            except KeyError:
                raise GGUFError(f"GGUF token {i} ({token!r}) is not in GPT-2's byte-to-character map") from None
        elif kind in (CONTROL, USER_DEFINED):
            added[i] = (token, kind == CONTROL)
        # UNUSED ids pad the vocabulary to the embedding's rows: no text encodes to them
    if len(ranks) != normal or not all(bytes([b]) in ranks for b in range(256)):
        raise GGUFError("the GGUF vocabulary is not a byte-level BPE's (tokens of the same bytes, or a byte "
                        "without a token of its own)")
    return ranks, added, _value(reader, "tokenizer.chat_template")
