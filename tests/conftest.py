"""Shared fixtures: small seeded random GLM-4 checkpoints, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_models import SHARED_MODELS

torch.set_num_threads(2)

# Two shapes: "small" (2 KV groups, head_dim 16) and "wide" (3 KV groups of 2 heads, head_dim 32).
SHAPES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "wide": dict(hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=32),
}


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(variant="glm", layout="hf", shape="small", **kw) -> Path, cached per arguments."""
    from glm4serve.model.random_checkpoint import write_random_checkpoint

    cache: dict = {}

    def make(variant="glm", layout="hf", shape="small", **kw) -> Path:
        key = (variant, layout, shape, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{variant}-{layout}-{shape}")
            kw.setdefault("rope_theta", 5e6)
            cache[key] = write_random_checkpoint(out, variant=variant, layout=layout, **SHAPES[shape], **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def real_chat_dir() -> Path:
    d = SHARED_MODELS / "glm-4-9b-chat"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d
