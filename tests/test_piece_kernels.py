"""benchmarks/bench_piece_kernels.py: the kernels the CUDA runner's compiled decode step launches, as
inductor writes them for a GPU, counted on the CPU. Every launch is a gap in a replayed graph: the
counts below are the most each piece may compile to; a change that adds launches fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def counts(tmp_path, *args) -> dict:
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_piece_kernels.py"), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("products", ["cublas", "reduction", "triton-unfolded"])
def test_a_decode_layer_is_eleven_launches(tmp_path, products):
    """A layer: the attention kernel, one kernel merging its splits, o, residual + norm, gate_up, SwiGLU,
    down, residual + norm, qkv, the rotary, and one store of both K and V. The products are cuBLAS's,
    inductor's reductions or gemv.py's kernel (its options not taken: --no-fold)."""
    one_row = [] if products == "cublas" else ["--one-row", "qkv,o,gate_up,down,lm_head"]
    figures = counts(tmp_path, *one_row, *(["--triton", "--no-fold"] if products == "triton-unfolded" else []))
    assert not figures["folded"]
    between = figures["pieces"]["between"]
    assert figures["splits"] == 64  # an H200's at batch 1: the merge reduces over 64 splits
    assert figures["launches_per_layer"] <= 11, between
    assert figures["extern_per_layer"] == (4 if products == "cublas" else 0), between
    assert figures["gemv_per_layer"] == (4 if products == "triton-unfolded" else 0), between
    assert sum("index_copy" in k for k in between) == 1, between  # K and V stored by one kernel
    assert len(figures["pieces"]["first"]) <= 4, figures["pieces"]["first"]


def test_a_folded_decode_layer_is_six_launches(tmp_path):
    """Every product on gemv.py's kernel, which does the small ops around it (one_row.py): the attention
    kernel, the merge of its splits, o with the residual add, gate_up with the norm before and SwiGLU
    after, down with the residual add, qkv with the next layer's norm, its bias and rotary and the
    store of K and V. The first layer's piece is the embedding, the rotary's angles and qkv; the
    last's ends in the output layer with the final norm, and the logits' cast to fp32."""
    figures = counts(tmp_path, "--one-row", "qkv,o,gate_up,down,lm_head", "--triton")
    pieces, between = figures["pieces"], figures["pieces"]["between"]
    assert figures["folded"]
    assert figures["launches_per_layer"] <= 6, between
    assert figures["gemv_per_layer"] == 4 and figures["extern_per_layer"] == 0, between
    assert between[-1] == "torch.ops.glm4serve.row_product_kv" and not any("index_copy" in k for k in between)
    assert len(pieces["first"]) <= 3 and pieces["first"][-1] == "torch.ops.glm4serve.row_product_kv", pieces["first"]
    assert len(pieces["last"]) <= 6 and sum(k.startswith("torch.ops.glm4serve") for k in pieces["last"]) == 4
