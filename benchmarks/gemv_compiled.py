"""gemv.py's kernel compiled for an H100/H200 (sm_90) on this CPU, for each blocks of its sweep: the
registers a thread takes (from the cubin, by the cuobjdump Triton ships), so how many programs an SM
holds and how many bytes of weight they load a step between them, the bytes in flight that keep a
matrix-vector product at the memory's bandwidth; and the barriers inside its loop. No GPU needed;
what the blocks are worth in time is bench_gpu.py's `one_row_products` to say.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/gemv_compiled.py

first for the plain product, then with the options of each product of the folded decode layer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

SM_REGISTERS, SM_WARPS, SM_PROGRAMS = 65536, 64, 32  # sm_90's (and sm_80's) limits per SM


# the kernel's options as the folded decode layer (one_row.py) launches it, by the products that take them
FOLDED = {"qkv": dict(HAS_BIAS=True, NORM=True, ROTARY=True, STORE_KV=True), "gate_up": dict(NORM=True, SWIGLU=True),
          "o, down": dict(RESIDUAL=True), "lm_head": dict(NORM=True)}


def compile_kernel(blocks, capability: int = 90, dtype: str = "bf16", bias: bool = False, options: dict | None = None):
    """gemv.py's kernel in `blocks` compiled by Triton for a GPU of that compute capability (no GPU
    needed), its inputs aligned as Triton finds glm-4-9b's; `options`: its constexpr flags (FOLDED's),
    all off by default (the plain product, a bias as `bias` says)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glm4serve.model import gemv

    kernel = gemv._kernel()
    flags = {**dict(HAS_BIAS=bias, NORM=False, SWIGLU=False, ROTARY=False, RESIDUAL=False, STORE_KV=False),
             **(options or {})}
    # programmatic dependent launch where the runner launches with it (gemv.launches_pdl)
    constants = dict(flags, HEAD_DIM=128, ROWS=blocks.rows, COLS=blocks.cols, PDL=capability >= 90)
    kinds = {"N": "i32", "K": "i32", "rotated": "i32", "eps": "fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
             "slot_ptr": "*i64", "kv_width": "i32", "slot_stride": "i32"}
    signature = {name: "constexpr" if name in constants else kinds.get(name, "*" + dtype) for name in kernel.arg_names}
    # pointers and sizes: multiples of 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if signature[name] not in ("constexpr", "fp32")}
    return triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=aligned),
                          target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": blocks.warps, "launch_pdl": capability >= 90})


def loop_barriers(compiled) -> int:
    """Barriers inside the kernel's loops over the input dim (each loop of its PTX, from its header to
    the next block's label): the products' loop, and the norm's sum of squares where it has one."""
    loops = compiled.asm["ptx"].split("Inner Loop Header")[1:]
    return sum(loop[: loop.index("$L__BB")].count("bar.sync") for loop in loops)


def resources(blocks, options: dict | None = None) -> dict:
    """For sm_90 in bf16: registers a thread, its stack, programs an SM holds, KiB of weight a step in
    flight per SM, barriers in the loop."""
    import triton

    compiled = compile_kernel(blocks, options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"STACK:(\d+)", usage).group(1))
    per_warp = 32 * -(-registers // 8) * 8  # registers are given out 8 a thread at a time
    programs = min(SM_PROGRAMS, SM_REGISTERS // (per_warp * blocks.warps), SM_WARPS // blocks.warps)
    return {"registers": registers, "stack_bytes": spilled, "programs_per_sm": programs,
            "kib_in_flight_per_sm": programs * blocks.rows * blocks.cols * 2 / 1024,
            "loop_barriers": loop_barriers(compiled)}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("run without TRITON_INTERPRET: under it Triton compiles nothing")
        return 1
    from glm4serve.model.gemv import SWEEP, Blocks

    print("blocks (rows x cols / warps): registers a thread, stack, programs an SM holds, KiB a step "
          "in flight per SM, barriers in the loop (sm_90, bf16)")
    for kind, options in {"plain": {}, **FOLDED}.items():
        print(f"{kind}:")
        for blocks in (Blocks(), *SWEEP):
            r = resources(blocks, options)
            print(f"{blocks!s:>12}: {r['registers']:3d} registers, stack {r['stack_bytes']}, "
                  f"{r['programs_per_sm']:2d} programs, {r['kib_in_flight_per_sm']:5.0f} KiB, "
                  f"{r['loop_barriers']} barriers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
