"""The layers' boundaries: the API never touches tensors, and the engine and model never know about HTTP."""

from __future__ import annotations

import subprocess
import sys


def modules_loaded_by(module: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_http_app_loads_no_torch():
    assert "torch" not in modules_loaded_by("glm4serve.api.app")


def test_the_engine_and_the_model_load_no_web_framework():
    for module in ("glm4serve.engine.async_engine", "glm4serve.model.glm4", "glm4serve.model.loader"):
        loaded = modules_loaded_by(module)
        assert not loaded & {"fastapi", "starlette", "uvicorn", "sse_starlette"}, module
