"""gemv.py's kernel compiled for an H100/H200 (sm_90) on this CPU, for each blocks of its sweep: the
registers a thread takes (from the cubin, by the cuobjdump Triton ships), so how many programs an SM
holds and how many bytes of weight they load a step between them, the bytes in flight that keep a
matrix-vector product at the memory's bandwidth; and the barriers inside its loop. No GPU needed;
what the blocks are worth in time is bench_gpu.py's `one_row_products` to say.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/gemv_compiled.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

SM_REGISTERS, SM_WARPS, SM_PROGRAMS = 65536, 64, 32  # sm_90's (and sm_80's) limits per SM


def compile_kernel(blocks, capability: int = 90, dtype: str = "bf16", bias: bool = False):
    """gemv.py's kernel in `blocks` compiled by Triton for a GPU of that compute capability (no GPU
    needed), its inputs aligned as Triton finds glm-4-9b's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from glm4serve.model import gemv

    kernel = gemv._kernel()
    constants = dict(HAS_BIAS=bias, ROWS=blocks.rows, COLS=blocks.cols)
    signature = {name: "constexpr" if name in constants else "i32" if name in ("N", "K") else "*" + dtype
                 for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5)}  # pointers, N and K: multiples of 16
    return triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=aligned),
                          target=GPUTarget("cuda", capability, 32), options={"num_warps": blocks.warps})


def loop_barriers(compiled) -> int:
    """Barriers inside the kernel's loop over the input dim (the first loop of its PTX)."""
    ptx = compiled.asm["ptx"]
    loop = ptx[ptx.index("Inner Loop Header"):]
    return loop[: loop.index("$L__BB", 1)].count("bar.sync")


def resources(blocks) -> dict:
    """For sm_90 in bf16: registers a thread, its stack, programs an SM holds, KiB of weight a step in
    flight per SM, barriers in the loop."""
    import triton

    compiled = compile_kernel(blocks)
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
    for blocks in (Blocks(), *SWEEP):
        r = resources(blocks)
        print(f"{blocks!s:>12}: {r['registers']:3d} registers, stack {r['stack_bytes']}, {r['programs_per_sm']:2d} "
              f"programs, {r['kib_in_flight_per_sm']:5.0f} KiB, {r['loop_barriers']} barriers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
