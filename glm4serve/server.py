"""From settings to a running engine: resolve the checkpoint, load model and tokenizer, size the
KV cache, start the engine loop. The HTTP app (api/) is built on what this returns."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from .api.settings import ServerSettings
from .engine.async_engine import AsyncEngine
from .engine.engine import EngineConfig, LLMEngine
from .engine.model_runner import ModelRunner
from .model.glm4 import load_model
from .model.kv_cache import BlockPool, KVCache, num_blocks_for
from .model.tokenizer import Tokenizer

log = logging.getLogger("glm4serve")

DEFAULT_CPU_KV_BYTES = 4 << 30  # like vLLM's CPU default KV space
# The demo needs 2 KiB per token: 1 GiB holds four full 131K contexts, and the first run on a
# small machine neither waits on nor needs 4 GiB of zeroed memory.
DEMO_KV_BYTES = 1 << 30
GPU_MEMORY_FRACTION = 0.9


def demo_model_dir() -> Path:
    """The built-in demo checkpoint: small random weights, made once in the user's cache."""
    from .model.random_checkpoint import write_random_checkpoint

    root = Path.home() / ".cache" / "glm4serve" / "demo-glm4-random-v1"
    if not (root / "config.json").is_file():
        log.info("creating the built-in demo checkpoint in %s", root)
        tmp = root.with_name(root.name + ".tmp")
        write_random_checkpoint(tmp, variant="glm", layout="hf", hidden_size=256, intermediate_size=512,
                                num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                                max_position_embeddings=131072, rope_theta=5e6, seed=0)
        tmp.rename(root)
    log.warning(
        "serving the built-in DEMO model: random weights, its replies are noise. "
        "Serve a real checkpoint with: glm4serve serve --model /path/to/glm-4-9b-chat"
    )
    return root


def resolve_model(model: str | None) -> Path:
    if model is None:
        return demo_model_dir()
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is neither a checkpoint directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download  # users with network: fetch into the hub cache

    log.info("fetching %s from the hub", model)
    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return device


def kv_budget(settings: ServerSettings, device: str) -> int | None:
    """KV cache bytes; None on CUDA when none is set: build_llm_engine sizes it once the weights
    are in GPU memory (measured before loading, the budget would leave no room for them)."""
    if settings.kv_cache_memory is not None:
        return settings.kv_cache_memory
    if settings.model is None:
        return DEMO_KV_BYTES
    if device == "cuda":
        return None
    return DEFAULT_CPU_KV_BYTES


def cuda_kv_budget(device="cuda") -> int:
    """As vLLM's gpu_memory_utilization: weights + KV cache take GPU_MEMORY_FRACTION of the GPU,
    the rest stays for activations. Call with the weights loaded."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    budget = int(total * GPU_MEMORY_FRACTION) - (total - free)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                         f"{total / 2**30:.1f} GiB after loading the weights): set kv_cache_memory")
    return budget


def build_llm_engine(path, engine_cfg: EngineConfig, dtype="auto", device="cpu") -> LLMEngine:
    """The synchronous engine over a checkpoint directory (benchmarks and tests use it directly)."""
    # The loader draws a tqdm bar only on a terminal; these lines mark the load in plain logs
    # (docker, systemd), where a redrawn bar would be noise.
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    log.info("loading weights from %s (%.2f GB)", path, size / 1e9)
    started = time.perf_counter()
    model = load_model(path, dtype=dtype, device=device, kv_block_size=engine_cfg.block_size)
    log.info("weights loaded in %.1fs", time.perf_counter() - started)
    tokenizer = Tokenizer.from_dir(path)
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    if engine_cfg.kv_cache_memory_bytes is None:  # CUDA, no budget given: what the weights left
        engine_cfg = dataclasses.replace(engine_cfg, kv_cache_memory_bytes=cuda_kv_budget(device))
    num_blocks = num_blocks_for(cfg, engine_cfg.kv_cache_config(), dtype)
    capacity = num_blocks * engine_cfg.block_size
    if engine_cfg.max_model_len and engine_cfg.max_model_len > capacity:
        raise ValueError(f"max_model_len {engine_cfg.max_model_len} needs more KV cache than the budget holds "
                         f"({capacity} tokens): raise kv_cache_memory or lower max_model_len")
    sched_cfg = engine_cfg.scheduler_config(cfg.max_position_embeddings, num_blocks)
    if sched_cfg.max_model_len < cfg.max_position_embeddings:
        log.warning("context capped at %d tokens by the KV cache budget (the model has %d positions)",
                    sched_cfg.max_model_len, cfg.max_position_embeddings)
    kv = KVCache(cfg, num_blocks, engine_cfg.block_size, dtype, device)
    log.info("model %s (%s, %s) on %s; KV cache %d blocks of %d tokens (%.2f GiB)",
             path, cfg.variant, dtype, device, num_blocks, engine_cfg.block_size, kv.nbytes / 2**30)
    runner = ModelRunner(model, kv, vocab_limit=tokenizer.vocab_size)
    return LLMEngine(runner, tokenizer, sched_cfg, BlockPool(num_blocks, engine_cfg.block_size),
                     tokenizer.stop_token_ids, vocab_size=tokenizer.vocab_size)


def build_engine(settings: ServerSettings):
    """-> (AsyncEngine started, Tokenizer, served model name, max_model_len)"""
    device = pick_device(settings.device)
    engine_cfg = EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        kv_cache_memory_bytes=kv_budget(settings, device),
    )
    # built on the engine loop's own thread: torch's parallel work stays on one OpenMP team
    engine = AsyncEngine.start_built_on_loop_thread(
        lambda: build_llm_engine(resolve_model(settings.model), engine_cfg, settings.dtype, device))
    llm = engine.engine
    name = settings.served_model_name or (Path(settings.model).name if settings.model else "glm4-demo")
    return engine, llm.tokenizer, name, llm.max_model_len
