"""Load GLM-4 checkpoints (safetensors in chatglm or HF naming, or a GGUF file) into our GLM4Model, one tensor
at a time.

`WEIGHT_NAMES` below is the only place where checkpoint names are mapped to ours. Everything
else (the expected set of names and shapes, the completeness check, the random checkpoints of
`random_checkpoint.py`) is derived from it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .gguf_blocks import INT4_CODES, INT4_CODES_GROUP
from .gguf_file import GGUFWeights, is_gguf, nearest_scheme
from .shard import Shard

INDEX_FILE = "model.safetensors.index.json"
# a tensor is read this much at a time (in float32): what a quantized linear or a dtype cast makes of it stays
# in the caches, and a GGUF file's widened blocks never take GBs at once (the embedding is 2.5 GB in float32)
READ_BYTES = 8 << 20
SINGLE_FILE = "model.safetensors"

# Checkpoint tensors that exist in real files but carry nothing we need.
# rotary frequencies some checkpoints carry (chatglm's, older transformers' rotary_emb buffers):
# recomputed from the config, as transformers does
IGNORED_SUFFIX = ".inv_freq"

# (our name, chatglm name, HF glm/glm4 name, GGUF name, when present). "{i}" is the layer index. "{qkv}"
# in an HF name stands for the three tensors q_proj, k_proj, v_proj, which are the row blocks q | k | v of
# our fused qkv (chatglm stores them fused already, in the same order). GGUF files hold either: llama.cpp
# names the fused tensor attn_qkv (from a chatglm checkpoint) and the three attn_q, attn_k, attn_v (from an
# HF one), so "{qkv}" there is "qkv" or each part. A chatglm name of None: that layout has no such tensor
# (glm4's extra norms exist in HF naming only).
# when: None = always, "bias" = only if cfg.attention_bias, "glm4" = only for the glm4 variant.
WEIGHT_NAMES: list[tuple[str, str | None, str, str, str | None]] = [
    ("embed.weight", "transformer.embedding.word_embeddings.weight", "model.embed_tokens.weight",
     "token_embd.weight", None),
    ("layers.{i}.input_norm.weight",
     "transformer.encoder.layers.{i}.input_layernorm.weight",
     "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", None),
    ("layers.{i}.attn.qkv.weight",
     "transformer.encoder.layers.{i}.self_attention.query_key_value.weight",
     "model.layers.{i}.self_attn.{qkv}_proj.weight", "blk.{i}.attn_{qkv}.weight", None),
    ("layers.{i}.attn.qkv.bias",
     "transformer.encoder.layers.{i}.self_attention.query_key_value.bias",
     "model.layers.{i}.self_attn.{qkv}_proj.bias", "blk.{i}.attn_{qkv}.bias", "bias"),
    ("layers.{i}.attn.o.weight",
     "transformer.encoder.layers.{i}.self_attention.dense.weight",
     "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", None),
    ("layers.{i}.post_attn_norm.weight", None, "model.layers.{i}.post_self_attn_layernorm.weight",
     "blk.{i}.post_attention_norm.weight", "glm4"),
    # post_attention_layernorm is the *pre-MLP* norm in both namings.
    ("layers.{i}.mlp_norm.weight",
     "transformer.encoder.layers.{i}.post_attention_layernorm.weight",
     "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", None),
    ("layers.{i}.mlp.gate_up.weight",
     "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",
     "model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", None),
    ("layers.{i}.mlp.down.weight",
     "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
     "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", None),
    ("layers.{i}.post_mlp_norm.weight", None, "model.layers.{i}.post_mlp_layernorm.weight",
     "blk.{i}.post_ffw_norm.weight", "glm4"),
    ("norm.weight", "transformer.encoder.final_layernorm.weight", "model.norm.weight", "output_norm.weight", None),
    ("lm_head.weight", "transformer.output_layer.weight", "lm_head.weight", "output.weight", None),
]
LAYOUT_COLUMN = {"chatglm": 1, "hf": 2, "gguf": 3}  # cfg.layout -> its names' place in a WEIGHT_NAMES row


class CheckpointError(ValueError):
    """The checkpoint files do not hold exactly the tensors the config describes."""


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor as stored in the checkpoint, and where it goes in our model."""

    name: str  # checkpoint name
    target: str  # our parameter name
    shape: tuple[int, ...]  # shape on disk
    rows: tuple[int, int] | None = None  # row range of the target it fills; None = all of it


def _shape_of(template: str, cfg: ModelConfig) -> tuple[int, ...]:
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    leaf = template.split(".", 2)[-1] if template.startswith("layers.") else template
    shapes = {
        "embed.weight": (V, H),
        "input_norm.weight": (H,),
        "attn.qkv.weight": (qkv, H),
        "attn.qkv.bias": (qkv,),
        "attn.o.weight": (H, cfg.q_size),
        "post_attn_norm.weight": (H,),
        "mlp_norm.weight": (H,),
        "mlp.gate_up.weight": (2 * F, H),
        "mlp.down.weight": (H, F),
        "post_mlp_norm.weight": (H,),
        "norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    return shapes[leaf]


def _present(when: str | None, cfg: ModelConfig) -> bool:
    return when is None or (when == "bias" and cfg.attention_bias) or (when == "glm4" and cfg.variant == "glm4")


def _layer_indices(template: str, cfg: ModelConfig) -> range:
    return range(cfg.num_layers) if "{i}" in template else range(1)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes (the state dict of GLM4Model) for this config, in model order."""
    out = {}
    for i in range(cfg.num_layers):
        for ours, *_, when in WEIGHT_NAMES:
            if "{i}" in ours and _present(when, cfg):
                out[ours.format(i=i)] = _shape_of(ours, cfg)
    for ours, *_, when in WEIGHT_NAMES:
        if "{i}" not in ours and _present(when, cfg):
            out[ours] = _shape_of(ours, cfg)
    order = ["embed.weight"] + [n for n in out if n.startswith("layers.")] + ["norm.weight", "lm_head.weight"]
    return {n: out[n] for n in order}


def checkpoint_tensors(cfg: ModelConfig, split_qkv: bool | None = None) -> dict[str, CheckpointTensor]:
    """Every tensor a checkpoint of `cfg.layout` must hold (rotary inv_freq buffers aside), by checkpoint name.
    split_qkv: whether a GGUF file holds q, k and v apart (the chatglm layout never does, the HF one always)."""
    if cfg.layout == "chatglm" and cfg.variant != "glm":
        raise CheckpointError(f"the chatglm layout has no names for the {cfg.variant!r} variant's extra norms")
    if split_qkv is None:
        if cfg.layout == "gguf":
            raise ValueError("a GGUF file's tensors depend on whether it holds q, k and v apart: pass split_qkv")
        split_qkv = cfg.layout == "hf"
    qkv_rows = {
        "q": (0, cfg.q_size),
        "k": (cfg.q_size, cfg.q_size + cfg.kv_size),
        "v": (cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size),
    }
    out = {}
    for row in WEIGHT_NAMES:
        ours, theirs, when = row[0], row[LAYOUT_COLUMN[cfg.layout]], row[-1]
        if not _present(when, cfg):
            continue
        shape = _shape_of(ours, cfg)
        for i in _layer_indices(ours, cfg):
            target = ours.format(i=i)
            if "{qkv}" not in theirs or not split_qkv:
                name = theirs.format(i=i, qkv="qkv")
                out[name] = CheckpointTensor(name, target, shape)
                continue
            for part, (start, stop) in qkv_rows.items():
                name = theirs.format(i=i, qkv=part)
                out[name] = CheckpointTensor(name, target, (stop - start, *shape[1:]), (start, stop))
    return out


def checkpoint_files(path: str | Path) -> dict[str, str]:
    """Map each tensor name to the file (name inside `path`) that holds it, per the index or the headers."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"index names shard {shard} which does not exist ({index})")
        return dict(weight_map)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {path}")
    where: dict[str, str] = {}
    for f in files:
        with _open(path / f) as sf:
            for name in sf.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name} is in both {where[name]} and {f}")
                where[name] = f
    return where


def _open(file: Path):
    """safe_open, with a file that is not whole (a cut download) named in a CheckpointError."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
        raise CheckpointError(f"{file} is truncated or not a safetensors file ({e})") from None


def _validate(path: Path, cfg: ModelConfig, where: dict[str, str], expected: dict[str, CheckpointTensor]):
    """Names and shapes, from headers only: fail before any tensor data is read."""
    from_index = (path / INDEX_FILE).is_file()
    for name in expected:
        if name not in where:
            source = INDEX_FILE if from_index else ", ".join(sorted(set(where.values())))
            raise CheckpointError(f"missing tensor {name} (not in {source})")
    for name, f in where.items():
        if name not in expected and not name.endswith(IGNORED_SUFFIX):
            raise CheckpointError(
                f"unexpected tensor {name} in {f} (not part of a {cfg.layout}-layout {cfg.variant} checkpoint)"
            )
    for f in sorted(set(where.values())):
        with _open(path / f) as sf:
            present = set(sf.keys())
            for name in (n for n, nf in where.items() if nf == f and n in expected):
                if name not in present:
                    raise CheckpointError(f"missing tensor {name} (expected in {f} per index)")
                shape = tuple(sf.get_slice(name).get_shape())
                if shape != expected[name].shape:
                    raise CheckpointError(f"tensor {name} in {f} has shape {shape}, expected {expected[name].shape}")


def load_weights(
    model: torch.nn.Module,
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    shard: Shard = Shard(),
) -> None:
    """Fill every parameter of `model` (our naming) from the checkpoint in `path`: a safetensors folder or a GGUF file.

    Reads one tensor at a time and copies it (cast to `dtype`) into the parameter already
    allocated on `device` (e.g. a model built on `meta`, then `to_empty(device=...)`), so the
    weights never exist twice in full. dtype None = the parameters' own dtype; device None = where
    the parameters are. progress None = a tqdm bar when stderr is a terminal. shard: the model holds
    this rank's part of each weight (shard.py), and only that part is read from the files.
    """
    path = Path(path)
    groups, expected = _gguf_groups(path, cfg) if is_gguf(path) else _safetensors_groups(path, cfg)
    targets = _targets(model)
    _check_model(targets, cfg, dtype, device, shard)

    filled_rows = {name: 0 for name in targets}
    bar = _progress_bar(len(expected), progress)
    with torch.no_grad():
        for opened, names in groups:
            with opened() as sf:
                for name in names:
                    spec = expected[name]
                    target = targets[spec.target]
                    codes = _takes_codes(sf, name, target) and shard.cut(spec.target, cfg) is None
                    for start, stop, tensor in _pieces(sf, spec, cfg, shard, codes):
                        if isinstance(target, torch.Tensor):
                            target[start:stop].copy_(tensor)  # copy_ casts dtype and moves device in one go
                        elif codes:  # int4 codes, scales and zeros, kept as they are
                            target.load_code_rows(start, stop, *tensor)
                        else:  # a quantized linear quantizes the rows as they come (quant.py)
                            target.load_weight_rows(start, stop, tensor)
                        filled_rows[spec.target] += stop - start
                    bar.update(1)
    bar.close()
    unfilled = [n for n, rows in filled_rows.items() if rows != _shape(targets[n])[0]]
    if unfilled:  # cannot happen with a consistent WEIGHT_NAMES; guards garbage from to_empty()
        raise CheckpointError(f"parameters left unfilled by the checkpoint: {unfilled}")


def _safetensors_groups(path: Path, cfg: ModelConfig):
    """(a function opening one file, the names to read from it) for each file of the checkpoint; what it holds."""
    expected = checkpoint_tensors(cfg)
    where = checkpoint_files(path)
    _validate(path, cfg, where, expected)
    names_by_file: dict[str, list[str]] = {}
    for name in expected:
        names_by_file.setdefault(where[name], []).append(name)
    return [(partial(_open, path / f), names) for f, names in sorted(names_by_file.items())], expected


def _gguf_groups(path: Path, cfg: ModelConfig):
    """The same for a GGUF file: one group, its tensors widened to floats as they are read (gguf_file.py)."""
    weights = GGUFWeights(path)
    expected = _gguf_tensors(weights, cfg)
    return [(lambda: weights, list(expected))], expected


def _gguf_tensors(weights: GGUFWeights, cfg: ModelConfig) -> dict[str, CheckpointTensor]:
    """checkpoint_tensors of a GGUF file, checked against the file's names and shapes."""
    path = weights.path
    expected = checkpoint_tensors(cfg, split_qkv="blk.0.attn_qkv.weight" not in weights.shapes)
    for name, spec in expected.items():
        if name not in weights.shapes:
            raise CheckpointError(f"missing tensor {name} in {path}")
        if weights.shapes[name] != spec.shape:
            raise CheckpointError(f"tensor {name} in {path} has shape {weights.shapes[name]}, expected {spec.shape}")
    extra = sorted(set(weights.shapes) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected tensors {extra[:5]} in {path} (not part of a {cfg.variant} GGUF file)")
    return expected


def gguf_linear_schemes(path: str | Path, cfg: ModelConfig) -> dict[str, str | None]:
    """Each of our linears (by module name) in the quantization nearest to its tensors' block types in a GGUF file
    (gguf_file.nearest_scheme; None: a float matrix, kept in the model's dtype). Where q, k and v lie apart in
    different types (llama-quantize gives v more bits in some layers) the widest of them decides."""
    weights = GGUFWeights(path)
    width = {"int4": 0, "int8": 1, None: 2}
    schemes: dict[str, str | None] = {}
    for name, spec in _gguf_tensors(weights, cfg).items():
        if len(spec.shape) != 2 or spec.target == "embed.weight":
            continue
        module, scheme = spec.target.removesuffix(".weight"), nearest_scheme(weights.tensors[name].tensor_type)
        if module not in schemes or width[scheme] > width[schemes[module]]:
            schemes[module] = scheme
    return schemes


def _takes_codes(sf, name: str, target) -> bool:
    """Whether a GGUF tensor's 4-bit blocks go into an int4 linear of their group as they are (gguf_blocks.py)."""
    return (isinstance(sf, GGUFWeights) and sf.get_slice(name).kind in INT4_CODES
            and getattr(target, "group", None) == INT4_CODES_GROUP and hasattr(target, "load_code_rows"))


def _pieces(sf, spec: CheckpointTensor, cfg: ModelConfig, shard: Shard, codes: bool = False):
    """(first row, end row, tensor) of the target that this checkpoint tensor fills on this rank, read
    from the file: the whole tensor, or only the rows or columns of this rank's cut (shard.py). codes: a GGUF
    tensor's rows as int4 (codes, scales, zeros) rather than floats (whole tensors only)."""
    rows = sf.get_slice(spec.name)
    start, stop = spec.rows or (0, spec.shape[0])  # where the tensor lies in the (whole) target
    cut = shard.cut(spec.target, cfg)
    if cut is None:
        step = max(1, READ_BYTES // (4 * math.prod(spec.shape[1:])))  # rows of READ_BYTES as float32
        for a in range(0, stop - start, step):
            b = min(stop - start, a + step)
            yield start + a, start + b, rows.codes(slice(a, b)) if codes else rows[a:b]
        return
    dim, ranges = cut
    if dim == 1:  # a column cut (o, down): checkpoints hold these whole, never split in rows
        yield start, stop, torch.cat([rows[:, a:b] for a, b in ranges], dim=1)
        return
    local = 0
    for a, b in ranges:  # this rank's rows of the target, in the order it holds them
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            yield local + lo - a, local + hi - a, rows[lo - start : hi - start]
        local += b - a


def _targets(model: torch.nn.Module) -> dict:
    """Where each of our names is loaded: its parameter, or the module of a quantized linear weight."""
    targets: dict = dict(model.named_parameters())
    for name, module in model.named_modules():
        if hasattr(module, "load_weight_rows"):
            targets[f"{name}.weight"] = module
    return targets


def _shape(target) -> tuple[int, ...]:
    return tuple(target.shape) if isinstance(target, torch.Tensor) else target.weight_shape


def _check_model(targets: dict, cfg: ModelConfig, dtype, device, shard: Shard) -> None:
    shapes = {name: shard.local_shape(name, shape, cfg) for name, shape in param_shapes(cfg).items()}
    missing = [n for n in shapes if n not in targets]
    extra = [n for n in targets if n not in shapes]
    if missing or extra:
        raise ValueError(f"model does not match the config: lacks parameters {missing}, has extra {extra}")
    device = torch.device(device) if device is not None else None
    for name, p in targets.items():
        if _shape(p) != shapes[name]:
            raise ValueError(f"model parameter {name} has shape {_shape(p)}, config says {shapes[name]}")
        if not isinstance(p, torch.Tensor):  # a quantized linear: its own dtype, made on its device
            continue
        if p.is_meta:
            raise ValueError(f"model parameter {name} is on the meta device: call model.to_empty(device=...) first")
        if dtype is not None and p.dtype != dtype:
            raise ValueError(f"model parameter {name} is {p.dtype}, asked to load as {dtype}")
        if device is not None and (p.device.type != device.type or (device.index is not None and p.device != device)):
            raise ValueError(f"model parameter {name} is on {p.device}, asked to load onto {device}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="loading weights", unit="tensor")
