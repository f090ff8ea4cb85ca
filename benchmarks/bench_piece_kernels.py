"""The kernels a batch-1 decode step launches on a GPU, counted on the CPU: inductor writes the CUDA
runner's compiled pieces (compiled_layers.CompiledLayers) as it would for a GPU, with its Triton backend
(here for the CPU's tensors), and nothing is compiled or run; each piece's launches are read from the
code it wrote. In a replayed CUDA graph each launch costs a gap of its own on top of its work, so on
an H200 a 40-layer step of ~730 kernels spent ~0.6 ms of 6.6 between them (BENCHMARKS.md).

    .venv/bin/python benchmarks/bench_piece_kernels.py [--one-row qkv,o,gate_up,down,lm_head] [--triton]
        [--no-fold] [--out F]

The model is glm-4-9b-chat's attention (32 heads, 2 KV heads of 128, half of each rotated) on a small
trunk; the attention kernel's splits are an H200's at batch 1 (--programs 264: two per SM). Launches
named `extern_kernels.*` are cuBLAS's (a split-K product adds a reduction kernel of cuBLAS's own, not
counted here), those named `torch.ops.glm4serve.*` gemv.py's (--triton: the one-row products by that
kernel, not inductor's reductions); the rest are inductor's Triton kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path


def launches(source: str) -> list[str]:
    """The kernels a generated module's `call` launches, in order."""
    call = source[source.index("def call("):]
    found = re.findall(r"(triton_\w+)\.run\(|(extern_kernels\.\w+)\(|= (torch\.ops\.glm4serve\.\w+)\.default\(", call)
    return [triton or extern or ours for triton, extern, ours in found]


def inductor_writes_gpu_code_here() -> None:
    """Inductor's Triton backend for CPU tensors, with Triton's driver and compiles stubbed: the code
    is written, no kernel is built or run (every output is left unwritten). gemv.py's kernel is not
    launched either: in Triton's interpreter its products took ~100 s of a folded step's count."""
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor
    import torch.utils._triton as torch_triton

    import glm4serve.model.gemv as gemv

    class NotRun:
        def run(self, *args, **kwargs):
            return None

        def __getitem__(self, grid):  # gemv.py's `_kernel()[grid](...)`
            return lambda *args, **kwargs: None

    inductor.cpu_backend = "triton"
    inductor.compile_threads = 1
    torch_triton.triton_backend = lambda: None  # no GPU driver to ask for its target
    torch_triton.triton_hash_with_backend = lambda: "code-only"
    async_compile.AsyncCompile.triton = lambda self, *args, **kwargs: NotRun()
    gemv._kernel = lambda: NotRun()


def count(one_row: list[str], programs: int, triton: bool = False, fold: bool = True) -> dict:
    import torch
    from torch._inductor.codecache import PyCodeCache

    import glm4serve.model.paged_decode as paged_decode
    from glm4serve.model.batch import ScheduledBatch, SeqChunk
    from glm4serve.model.cuda_runner import CudaGraphRunner
    from glm4serve.model.gemv import Blocks
    from glm4serve.model.glm4 import load_model
    from glm4serve.model.random_checkpoint import write_random_checkpoint

    paged_decode._programs = lambda device: programs  # the splits of a GPU with programs / 2 SMs
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, hidden_size=512, intermediate_size=1024, num_layers=3, num_heads=32,
                                num_kv_heads=2, head_dim=128, vocab_size=4096)
        model = load_model(d, dtype="bfloat16", device="cpu")
    kernels = dict.fromkeys(one_row, Blocks() if triton else None)
    runner = CudaGraphRunner(model, 16, 16, None, max_num_seqs=1, max_model_len=256, capture=False, one_row=kernels,
                             fold=fold)
    folded = runner.folded
    before = len(PyCodeCache.modules)
    with torch.inference_mode():
        runner.execute(ScheduledBatch([SeqChunk([5], 3, [0])]))  # one decode step: compiles every piece
    runner.close()
    modules = PyCodeCache.modules[before:]
    if len(modules) != 3:
        raise RuntimeError(f"expected the 3 pieces of a decode step (first, between, last), got {len(modules)}")
    pieces = {name: launches(Path(m.__file__).read_text()) for name, m in zip(("first", "between", "last"), modules)}
    per_layer = len(pieces["between"]) + 1  # and the attention kernel
    return {"one_row": one_row, "triton": triton, "folded": folded,
            "splits": paged_decode.num_splits(1, 2, torch.device("cpu")),
            "pieces": pieces, "launches_per_layer": per_layer,
            "launches_per_step_40_layers": len(pieces["first"]) + 39 * per_layer + 1 + len(pieces["last"]),
            "extern_per_layer": sum(k.startswith("extern") for k in pieces["between"]),
            "gemv_per_layer": sum(k.startswith("torch.ops.glm4serve") for k in pieces["between"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one-row", default="", help="linears whose one-row products are reductions, comma-separated")
    ap.add_argument("--triton", action="store_true", help="the --one-row products by gemv.py's kernel")
    ap.add_argument("--no-fold", action="store_true", help="with --triton: not the folded pieces (one_row.py)")
    ap.add_argument("--programs", type=int, default=264, help="the attention kernel's programs a launch")
    ap.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the attention kernel runs in Triton's interpreter
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # this code never mixes with real kernels
    inductor_writes_gpu_code_here()
    figures = count([n for n in args.one_row.split(",") if n], args.programs, args.triton, not args.no_fold)
    for name, kernels in figures["pieces"].items():
        print(f"{name}: {len(kernels)} launches: {' '.join(kernels)}")
    print(f"a layer: {figures['launches_per_layer']} launches ({figures['extern_per_layer']} cuBLAS, "
          f"{'small ops folded into the products, ' if figures['folded'] else ''}"
          f"{figures['gemv_per_layer']} gemv.py); "
          f"a 40-layer step: {figures['launches_per_step_40_layers']} (splits {figures['splits']})")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
