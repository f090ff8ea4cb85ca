"""How far bf16, int8 and int4 weights move the next-token distributions from float32.

For each prompt, every position's next-token distribution (teacher-forced over the prompt) of the
model as served (bf16 around the linears for int8/int4, as a bf16 checkpoint loads) against the
same checkpoint in float32: mean KL(fp32 || served) and top-1 agreement; "bf16, fp8 KV" is bf16 over an fp8 KV
cache (--kv-cache-dtype fp8), and with --kv-only that mode and bf16 alone; with --gguf Q4_0,Q8_0 the weights as
GGUF files of those block types, widened and as the server serves them by default (gguf_modes); with
--gguf-files F.gguf,... files made elsewhere of the same weights (llama-quantize's Q4_K_M of the --checkpoint),
widened, by default and all int4 (--gguf-overrides: their config's --hf-overrides). Every position is teacher-forced one
token at a time (decodes: products of one row), or with --prefill each prompt in one chunk whose every position
gives logits (products of as many rows as the prompt's tokens: the prefill kernels). Where int4_int8.c builds (no
AMX), int4 twice, every product through int4_gemm (int16 activations: one row beside int8_gemm.c) and through
int4_int8.c (int8 per group of inputs: batches there, every row count where AVX2 alone runs). On a 9B-shaped slice
(glm-4-9b-chat's layer shapes, random bf16 weights) by default, or on any checkpoint:

    .venv/bin/python benchmarks/bench_quant_quality.py [--checkpoint DIR] [--layers 2] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.model import int8_kernel
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.glm4 import load_model
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.model.runner import EagerRunner

SLICE_9B = dict(GLM4_9B_CHAT, dtype="bfloat16")  # num_layers: --layers
MODES = {"bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4"),
         "bf16, fp8 KV": ("bfloat16", None)}
KV_MODES = {"bf16, fp8 KV"}  # modes whose KV cache is fp8



def all_position_logits(path, dtype: str, quantization: str | None, prompts: list[list[int]],
                        kv_dtype: torch.dtype | None = None, prefill: bool = False,
                        hf_overrides: dict | None = None) -> torch.Tensor:
    """[sum of prompt lengths, V] fp32 logits, every position of every prompt (one prefill each)."""
    model = load_model(path, dtype=dtype, quantization=quantization, hf_overrides=hf_overrides)
    longest = max(len(p) for p in prompts)
    runner = EagerRunner(model, -(-longest // 16), 16, kv_dtype=kv_dtype)
    rows = []
    for p in prompts:
        pool = BlockPool(runner.num_blocks, 16)
        table = pool.allocate(pool.blocks_needed(len(p)))
        if prefill:
            rows.extend(runner.execute(ScheduledBatch([SeqChunk(p, 0, table, all_logits=True)])))
            continue
        # one chunk per token prefix would recompute; a prefill gives the last position only, so feed
        # the prompt token by token (each step a one-token chunk over the cache)
        for i, t in enumerate(p):
            rows.append(runner.execute(ScheduledBatch([SeqChunk([t], i, table)]))[0])
    return torch.stack(rows)


def distribution_error(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(softmax(ref) || softmax(got)), top-1 agreement) over the rows."""
    ref_logp, got_logp = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return kl, top1


def gguf_modes(path: Path, kinds: list[str], out: Path) -> dict[str, tuple]:
    """For each GGUF block type, the checkpoint written as a file of it (every matrix that type: llama-quantize's
    --pure), served widened (the file's own values, as llama.cpp runs them) and as glm4serve serves it by
    default on CPU ("gguf": the nearest of int8 and int4)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_files import write_gguf

    files = {kind: write_gguf(Path(path), out / f"quality-{kind}.gguf", kind) for kind in kinds}
    return {name: mode for kind, f in files.items() for name, mode in file_modes(f, kind, ("none", "gguf")).items()}


def file_modes(f: Path, label: str, ways=("none", "gguf", "int4"), overrides: dict | None = None) -> dict[str, tuple]:
    """A GGUF file of the checkpoint's weights served each of these ways (--quantization): (dtype, quantization,
    file, hf_overrides) by the mode's name."""
    name = {"none": "widened", "gguf": "by default (gguf)", "int4": "all int4"}
    return {f"GGUF {label}, {name[w]}": ("bfloat16", None if w == "none" else w, f, overrides) for w in ways}


def compare(path, prompts: list[list[int]], modes=MODES, prefill: bool = False) -> dict[str, tuple[float, float]]:
    ref = all_position_logits(path, "float32", None, prompts, prefill=prefill)
    out = {}
    for name, (dtype, q, *gguf) in modes.items():
        if gguf:
            file, overrides = gguf
            logits = all_position_logits(file, dtype, q, prompts, prefill=prefill, hf_overrides=overrides)
            out[name] = distribution_error(ref, logits)
            continue
        if q != "int4" or not int8_kernel.int4_int8_fits(int8_kernel.int4_int8_min_rows(), 64, 64, 64):
            kv = torch.float8_e4m3fn if name in KV_MODES else None
            out[name] = distribution_error(ref, all_position_logits(path, dtype, q, prompts, kv, prefill))
            continue
        min_rows = int8_kernel.int4_int8_min_rows
        try:  # a row's result is the same alone or in a batch
            for activations, rows in (("int16", 1 << 30), ("int8", 1)):
                int8_kernel.int4_int8_min_rows = lambda rows=rows: rows
                logits = all_position_logits(path, dtype, q, prompts, prefill=prefill)
                out[name if activations == "int16" else f"{name}, int8 activations"] = distribution_error(ref, logits)
        finally:
            int8_kernel.int4_int8_min_rows = min_rows
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="default: a 9B-shaped slice with random bf16 weights")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--kv-only", action="store_true", help="bf16 and bf16 over an fp8 KV cache only")
    ap.add_argument("--prefill", action="store_true", help="each prompt in one chunk (module docstring)")
    ap.add_argument("--gguf", default="", help="GGUF block types (Q4_0,Q8_0): the slice as such files (gguf_modes)")
    ap.add_argument("--gguf-files", default="", help="GGUF files of the --checkpoint's weights (file_modes)")
    ap.add_argument("--gguf-overrides", type=json.loads, default=None,
                    help="--hf-overrides for the --gguf-files (a -hf checkpoint's converter slip, README)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = a.checkpoint or write_random_checkpoint(d, **{**SLICE_9B, "num_layers": a.layers})
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 2000, (a.prompt_tokens,), generator=g).tolist() for _ in range(a.prompts)]
        modes = {m: MODES[m] for m in ("bf16", "bf16, fp8 KV")} if a.kv_only else MODES
        if a.gguf or a.gguf_files:
            modes = {m: MODES[m] for m in ("bf16", "int8", "int4")}
            if a.gguf:
                modes |= gguf_modes(path, a.gguf.split(","), Path(d))
            for f in filter(None, a.gguf_files.split(",")):
                modes |= file_modes(Path(f), Path(f).name, overrides=a.gguf_overrides)
        results = compare(path, prompts, modes, a.prefill)
    print(f"{a.prompts} prompts x {a.prompt_tokens} positions, vs float32 of the same weights:")
    for name, (kl, top1) in results.items():
        print(f"  {name}: mean KL {kl:.3e}, top-1 agreement {top1:.1%}")
    bf16_kl = results["bf16"][0]
    print("  " + "; ".join(f"{m} KL / bf16 KL = {results[m][0] / bf16_kl:.2f}" for m in results if m != "bf16"))


if __name__ == "__main__":
    main()
