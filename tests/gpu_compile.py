"""Our Triton kernels compiled for GPUs on a machine without one (Triton's own compiler, ptxas included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiled_in_a_fresh_process(module: str, targets: list) -> dict:
    """`module`'s compile_for_gpus(targets) run in a Python without TRITON_INTERPRET (under it, Triton's
    own library functions are interpreted ones and nothing compiles) -> what it returned, through JSON.
    The targets' reprs are evaluated there, with `module`'s names in scope."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json; from {module} import *; print(json.dumps(compile_for_gpus({targets!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def each_compiled(targets: list, compile_one) -> dict:
    """{str(target): compile_one(*target), or the repr of what it raised} for each target."""
    results = {}
    for target in targets:
        try:
            results[str(tuple(target))] = compile_one(*target)
        except Exception as e:  # noqa: BLE001
            results[str(tuple(target))] = repr(e)[-600:]
    return results
