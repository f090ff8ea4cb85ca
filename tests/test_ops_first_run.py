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


def test_engine_steps_default_to_vllms_for_the_device(monkeypatch):
    """max_num_batched_tokens, unset: vLLM's server defaults, 8192 on a GPU of 70 GiB or more but an
    A100 (H100, H200), else 2048 (CPU, smaller GPUs, A100s); set, it is taken as it is."""
    import types

    import torch

    from glm4serve.engine.config import EngineArgs

    gpu = types.SimpleNamespace()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    steps = lambda device, **kw: EngineArgs(**kw).scheduler_config(4096, device).max_num_batched_tokens  # noqa: E731
    for name, gib, want in (("NVIDIA H200", 139.8, 8192), ("NVIDIA H100 80GB HBM3", 79.1, 8192),
                            ("NVIDIA A100-SXM4-80GB", 79.2, 2048), ("NVIDIA GeForce RTX 4090", 23.6, 2048),
                            ("NVIDIA L40S", 44.4, 2048)):
        gpu.name, gpu.total_memory = name, int(gib * 2**30)
        assert steps("cuda") == want, name
        assert steps("cuda", max_num_batched_tokens=4096) == 4096
    assert steps("cpu") == 2048 and steps("cpu", max_num_batched_tokens=512) == 512
