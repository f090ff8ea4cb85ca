"""First run on a real model: the checkpoint load shows a tqdm bar on a terminal, and stays
quiet (the server logs a start and an end line instead) when stderr is a pipe or a log file."""

from __future__ import annotations

import io
import sys

from glm4serve.model.glm4 import load_model


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_weight_loading_bar_on_a_terminal_only(make_checkpoint, monkeypatch):
    path = make_checkpoint("glm", "hf", "small")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_model(path, dtype="float32")
    bar = terminal.getvalue()
    assert "loading weights" in bar and "100%" in bar

    pipe = io.StringIO()  # isatty() is False: docker logs, CI
    monkeypatch.setattr(sys, "stderr", pipe)
    load_model(path, dtype="float32")
    assert pipe.getvalue() == ""


def test_the_demo_gets_a_small_kv_budget_unless_one_is_set(monkeypatch):
    for key in ("GLM4SERVE_MODEL", "GLM4SERVE_KV_CACHE_MEMORY", "GLM4SERVE_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    from glm4serve.api.settings import ServerSettings
    from glm4serve.engine.config import DEFAULT_CPU_KV_BYTES, DEMO_KV_BYTES, kv_budget

    assert kv_budget(ServerSettings(), "cpu") == DEMO_KV_BYTES < DEFAULT_CPU_KV_BYTES
    assert kv_budget(ServerSettings(model="/some/checkpoint"), "cpu") == DEFAULT_CPU_KV_BYTES
    assert kv_budget(ServerSettings(kv_cache_memory="64MiB"), "cpu") == 64 << 20


def test_cuda_kv_budget_is_what_the_loaded_weights_leave(monkeypatch):
    import pytest
    import torch

    for key in ("GLM4SERVE_MODEL", "GLM4SERVE_KV_CACHE_MEMORY", "GLM4SERVE_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    from glm4serve.api.settings import ServerSettings
    from glm4serve.engine.config import GPU_MEMORY_FRACTION, kv_budget

    # build_llm_engine plans the cache after the load: 90% of the free memory measured before it
    # would leave none for the weights
    model = ServerSettings(model="/some/checkpoint")
    assert kv_budget(ServerSettings(model="/some/checkpoint", kv_cache_memory="2GiB"), "cuda") == 2 << 30
    total, used = 80 << 30, 20 << 30  # weights and the CUDA context already in memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used, total))
    assert kv_budget(model, "cuda") == int(total * GPU_MEMORY_FRACTION) - used
    assert kv_budget(ServerSettings(model="/some/checkpoint", gpu_memory_utilization=0.5), "cuda") == (40 - 20) << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, total))
    with pytest.raises(ValueError, match="kv_cache_memory"):
        kv_budget(model, "cuda")
