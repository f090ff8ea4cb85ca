"""A checkpoint whose greedy output is scripted: a real GLM-4 checkpoint (real formats, real
engine path) whose weights make the next token a function of the current token only.

Every layer's output projections (o_proj, down_proj) are zero, so the residual stream at each
position is just the token's embedding; the output layer then maps each scripted token's
normalized embedding onto the next scripted token. Random embeddings in 256 dimensions are
nearly orthogonal, so the argmax is the scripted successor by a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm4serve.model.random_checkpoint import write_random_checkpoint
from glm4serve.model.tokenizer import Tokenizer


def write_steered_checkpoint(out_dir, script: list[str]) -> Path:
    """script: texts (special tokens allowed) whose concatenation the model continues greedily,
    e.g. ["<|assistant|>", 'get_weather\\n{"city": "北京"}', "<|observation|>"]."""
    path = write_random_checkpoint(out_dir, variant="glm", layout="hf", hidden_size=256, intermediate_size=256,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=5e6, seed=5)
    tok = Tokenizer.from_dir(path)
    ids = [i for text in script for i in tok.encode(text, allow_special=True)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a scripted token repeats, a bigram model cannot follow it: {ids}")
    f = path / "model.safetensors"
    w = load_file(f)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name].zero_()
    emb, norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
    eps = 1e-5
    head = torch.zeros_like(w["lm_head.weight"])
    for a, b in zip(ids, ids[1:]):
        e = emb[a]
        h = norm * e * torch.rsqrt(e.pow(2).mean() + eps)  # the final norm of a lone embedding
        head[b] += 20.0 * h / h.norm()
    w["lm_head.weight"] = head
    save_file(w, f, metadata={"format": "pt"})
    return path
