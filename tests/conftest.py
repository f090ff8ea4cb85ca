"""Shared fixtures: small seeded random GLM-4 checkpoints, made once per test session; the device the
model tests run on (`pytest --device cuda` on a GPU machine) and the tolerances of each dtype."""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from shared_models import SHARED_MODELS

torch.set_num_threads(2)

# "small" (2 KV groups, head_dim 16), "wide" (3 KV groups of 2 heads, head_dim 32) and "gqa128":
# glm-4-9b's attention (32 query heads over 2 KV heads of 128) on a narrow residual stream.
SHAPES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "wide": dict(hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=32),
    "gqa128": dict(hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=32, num_kv_heads=2, head_dim=128),
}

# The dtypes a test that takes `dtype` runs in. On CPU float32 only, as CI always has; a GPU serves
# in half precision, so there the tests run in each of these.
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16", "float16")}


@dataclass(frozen=True)
class Tolerance:
    """How far our logits may lie from transformers' float32 logits on the same weights: max |diff|
    over the logit scale (the largest |logit|, at least 1)."""

    floor: float  # always allowed
    times_reference: float = 0.0  # half precision: this many times transformers' own error in that dtype

    def assert_close(self, ours: torch.Tensor, truth: torch.Tensor, same_dtype: torch.Tensor | None = None):
        """ours and same_dtype (transformers in our dtype, for half precision) against truth."""
        ours, truth = ours.float().cpu(), truth.float().cpu()
        scale = max(truth.abs().max().item(), 1.0)
        diff = (ours - truth).abs().max().item()
        bound = self.floor
        if same_dtype is not None:
            same_dtype = same_dtype.float().cpu()
            their_diff = (same_dtype - truth).abs().max().item()
            bound = max(bound, self.times_reference * their_diff / scale)
            # the same next tokens as transformers picks in that dtype, but for near ties: a pick whose true
            # logit lies within twice transformers' own rounding error of the top one (an H200 picked one
            # 0.0003 below it, transformers' error being 0.006)
            tie = 2 * their_diff
            agree = lambda x: (margin(truth, x.argmax(-1)) <= tie).float().mean().item()  # noqa: E731
            ours_top1, their_top1 = agree(ours), agree(same_dtype)
            assert ours_top1 >= their_top1 - 0.15, (
                f"top-1 agreement {ours_top1:.2f}, transformers' {their_top1:.2f}; true margins of our picks "
                f"{[round(m, 4) for m in margin(truth, ours.argmax(-1)).flatten().tolist()]} (ties up to {tie:.3g})")
        assert diff <= bound * scale, f"max abs diff {diff:.3g} at logit scale {scale:.3g} (bound {bound:.3g})"


def margin(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """How far below each row's top logit the picked token's logit lies."""
    return logits.max(-1).values - logits.gather(-1, picks.unsqueeze(-1)).squeeze(-1)


TOLERANCES = {
    # float32: summation order only (seen ~1e-6, on CPU and on an H100)
    "float32": Tolerance(1e-4),
    # half precision: rounding; on an H100 ours and transformers' bf16 errors were alike (0.0073 vs 0.0073)
    "bfloat16": Tolerance(0.02, times_reference=3),
    "float16": Tolerance(0.02, times_reference=3),
}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the model, engine and end-to-end tests run; cuda adds half-precision "
                          "variants and the GPU-only tests (marked cuda)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a GPU-only test, collected only with --device cuda")
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    if config.getoption("--device") == "cpu":
        # the GPU runner's Triton kernel (model/paged_decode.py) runs on CPU tensors in Triton's interpreter
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _server_logs_in_pytest_tmp(tmp_path_factory):
    """The logs of the servers the tests start (server_proc.py) go where pytest's tmp_path does."""
    os.environ["GLM4SERVE_TEST_LOGS"] = str(tmp_path_factory.mktemp("server-logs"))


def pytest_pycollect_makeitem(collector, name, obj):
    """Tests marked cuda do not exist without --device cuda: neither run nor skipped on CPU."""
    marks = getattr(obj, "pytestmark", []) if inspect.isfunction(obj) else []
    if collector.config.getoption("--device") != "cuda" and any(m.name == "cuda" for m in marks):
        return []
    return None


def pytest_generate_tests(metafunc):
    """A test taking `dtype` runs in each of the device's DTYPES, unless it names its own."""
    device = metafunc.config.getoption("--device")
    own = [m.args[0] for m in metafunc.definition.iter_markers("parametrize")]
    own = {n.strip() for names in own for n in (names.split(",") if isinstance(names, str) else names)}
    if "dtype" in metafunc.fixturenames and "dtype" not in own and len(DTYPES[device]) > 1:
        metafunc.parametrize("dtype", DTYPES[device])


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture
def dtype() -> str:
    """float32 where the device has no other dtype to test (pytest_generate_tests parametrizes it where it has)."""
    return "float32"


@pytest.fixture(scope="session")
def tolerances() -> dict[str, Tolerance]:
    return TOLERANCES


@pytest.fixture
def kernel_runs(device):
    """Skips where our Triton kernels (paged_decode.py, gemv.py) cannot run: on CPU, Triton's interpreter
    before 3.7 takes a loop bound with int() of a one-element array, which NumPy 2.4 refuses (the GPU
    image's Triton 3.6 does)."""
    if device == "cpu":
        import numpy
        import triton

        def version(module):
            return tuple(int(x) for x in re.findall(r"\d+", module.__version__)[:2])

        if version(triton) < (3, 7) and version(numpy) >= (2, 4):
            pytest.skip(f"Triton {triton.__version__}'s interpreter fails on NumPy {numpy.__version__}")


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


# GLM-4-0414's model card's YaRN (4.x's key), and transformers 5.x's keys with every knob set; each stretches a
# trained context of 64 (yarn_checkpoint)
YARN_SCALINGS = {
    "4.x": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    "5.x": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "factor": 3.0, "original_max_position_embeddings": 64, "beta_fast": 16,
                                "beta_slow": 2, "attention_factor": 1.3, "truncate": False}},
}


@pytest.fixture(scope="module")
def yarn_checkpoint(make_checkpoint, tmp_path_factory):
    """yarn_checkpoint(style, variant="glm4") -> (a checkpoint with YARN_SCALINGS[style] in its config, the same
    weights under plain RoPE); rope_theta 10000, a trained context of 64."""
    import json
    import shutil

    def make(style: str, variant: str = "glm4") -> tuple[Path, Path]:
        plain = make_checkpoint(variant, "hf", "wide", rope_theta=10000.0, config_style=style)
        path = tmp_path_factory.mktemp(f"yarn-{variant}-{style}") / "ckpt"
        shutil.copytree(plain, path)
        config = json.loads((path / "config.json").read_text())
        config.update(YARN_SCALINGS[style], max_position_embeddings=64)
        (path / "config.json").write_text(json.dumps(config))
        return path, plain

    return make


@pytest.fixture(scope="session")
def real_chat_dir() -> Path:
    d = SHARED_MODELS / "glm-4-9b-chat"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    return d
