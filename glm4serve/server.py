"""From settings to a running engine: resolve the checkpoint, load model and tokenizer, size the
KV cache, start the engine loop. The HTTP app (api/) is built on what this returns."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .api.settings import ServerSettings
from .engine.async_engine import AsyncEngine
from .engine.block_pool import BlockPool
from .engine.config import EngineArgs, plan_kv_cache
from .engine.engine import LLMEngine
from .model.cpu_linear import limit_onednn_caches
from .model.glm4 import GLM4Model, load_model
from .model.gguf_blocks import INT4_CODES
from .model.gguf_file import holds_int4_codes, is_gguf, open_gguf, quantized_types, weight_types
from .model.kv_cache import bytes_per_token, kv_cache_dtype
from .model.lora import load_loras
from .model.runner import make_runner
from .model.tp import TensorParallelRunner
from .model.tokenizer import Tokenizer

log = logging.getLogger("glm4serve")


def demo_model_dir() -> Path:
    """The built-in demo checkpoint: small random weights, made once in the user's cache."""
    from .model.random_checkpoint import write_random_checkpoint

    root = Path.home() / ".cache" / "glm4serve" / "demo-glm4-random-v1"
    if not (root / "config.json").is_file():
        log.info("creating the built-in demo checkpoint in %s", root)
        tmp = root.with_name(root.name + ".tmp")
        write_random_checkpoint(tmp, variant="glm", layout="hf", hidden_size=256, intermediate_size=512,
                                num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, seed=0)
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
    if p.is_dir() or is_gguf(p):
        return p
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is neither a checkpoint directory, a .gguf file nor a hub id "
                                "(owner/name)")
    from huggingface_hub import snapshot_download  # users with network: fetch into the hub cache

    log.info("fetching %s from the hub", model)
    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))


def weight_quantization(asked: str | None, path: Path, device: str) -> str | None:
    """The quantization the linears get at load: as asked ("none": the weights as stored, in --dtype); by default
    none, but for a GGUF file of block types (Q4_0, Q8_0, Q4_K_M's mix ...) on CPU "gguf": each matrix in the one
    of ours nearest to its type, as those are what its user chose to fit the memory. int4 holds Q4_0, Q4_1 and
    Q4_K blocks as they are (load_model), the others are re-quantized."""
    if asked is not None:
        return None if asked == "none" else asked
    if not is_gguf(path):
        return None
    reader = open_gguf(path)
    nearest, kinds = quantized_types(reader), weight_types(reader)
    if not nearest:
        return None
    if device != "cpu":
        log.warning("the GGUF file's matrices are %s: widened to the model's dtype on %s (int8/int4 run on CPU)",
                    kinds, device)
        return None
    log.info("the GGUF file's matrices are %s: each served in the quantization of ours nearest to its type", kinds)
    kept = [t for t in nearest if t in INT4_CODES] if holds_int4_codes(reader) else []  # as load_model keeps them
    if kept:
        log.info("the GGUF file's %s matrices: served as int4 groups of 32 holding their 4-bit codes, scales and "
                 "zeros as they are (the scales and zeros rounded to bf16)", ", ".join(kept))
    for ours in ("int8", "int4"):
        others = [t for t, s in nearest.items() if s == ours and t not in kept]
        if others:
            log.warning("the GGUF file's %s matrices, block types glm4serve has no kernels for: re-quantized at load "
                        "to %s, the nearest of ours (not bit-exact; --quantization none serves them exactly, widened "
                        "to --dtype)", ", ".join(others), ours)
    return "gguf"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return device


def build_llm_engine(args: EngineArgs) -> LLMEngine:
    """The synchronous engine for these arguments (benchmarks and tests use it directly)."""
    path, device = resolve_model(args.model), pick_device(args.device)
    if args.seed is not None:  # requests without a seed draw from torch's own generator (engine/sampler.py)
        torch.manual_seed(args.seed)
    if device == "cpu":  # before loading: packing the weights is oneDNN's first work
        limit_onednn_caches()
    # The loader draws a tqdm bar only on a terminal; these lines mark the load in plain logs
    # (docker, systemd), where a redrawn bar would be noise.
    files = [path] if is_gguf(path) else list(Path(path).glob("*.safetensors"))
    log.info("loading weights from %s (%.2f GB)", path, sum(f.stat().st_size for f in files) / 1e9)
    started = time.perf_counter()
    quantization = weight_quantization(args.quantization, path, device)
    if quantization is not None and device != "cpu":
        raise ValueError(f"quantization {quantization!r} runs on CPU only (the kernels are CPU ones)")
    if args.kv_cache_dtype != "auto" and device != "cpu":
        raise ValueError(f"kv_cache_dtype {args.kv_cache_dtype!r} runs on CPU only for now (the GPU's decode kernel "
                         "reads the model's dtype)")
    tokenizer = Tokenizer.from_dir(path)
    if args.tensor_parallel_size > 1:
        if args.lora_modules or args.allow_runtime_lora_updating:
            raise ValueError("LoRA adapters (--lora-modules, --allow-runtime-lora-updating) are not supported "
                             "with tensor_parallel_size > 1")
        tp = TensorParallelRunner.start(path, args.dtype, device, quantization, args.tensor_parallel_size,
                                        args.hf_overrides)
        log.info("weights loaded in %.1fs (rank 0's part of %d)", time.perf_counter() - started,
                 args.tensor_parallel_size)
        return engine_for_model(tp.model, tokenizer, args, device, tp)
    model = load_model(path, dtype=args.dtype, device=device, quantization=quantization,
                       hf_overrides=args.hf_overrides)
    log.info("weights loaded in %.1fs", time.perf_counter() - started)
    return engine_for_model(model, tokenizer, args, device)


def engine_for_model(model: GLM4Model, tokenizer, args: EngineArgs, device: str,
                     tp: TensorParallelRunner | None = None) -> LLMEngine:
    """The engine over a loaded model: the KV cache plan, the runner chosen for it (or the ranks of a
    tensor-parallel one, given its rank 0), the scheduler."""
    cfg, dtype = model.cfg, next(model.parameters()).dtype
    kv_dtype = kv_cache_dtype(args.kv_cache_dtype, dtype)
    if tokenizer.vocab_size > cfg.vocab_size:  # its last ids would index past the embedding: a 500 a request
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary only "
                         f"{cfg.vocab_size}: they are not of one checkpoint")
    loras = None
    if tp is None and (args.lora_modules or args.allow_runtime_lora_updating):
        # before the KV cache's plan: on a GPU the budget is what the weights, adapters' included, leave
        loras = load_loras(args.lora_modules, model, runtime=args.allow_runtime_lora_updating)
    token_bytes = bytes_per_token(cfg, kv_dtype, model.shard)  # this rank's KV heads: every rank has as many
    plan = plan_kv_cache(args, cfg.max_position_embeddings, token_bytes, device)
    if not args.max_model_len and plan.max_model_len < cfg.max_position_embeddings:  # not what was asked for
        log.warning("context capped at %d tokens by the KV cache budget (the model has %d positions)",
                    plan.max_model_len, cfg.max_position_embeddings)
    if tp is None:
        runner = make_runner(model, plan.num_blocks, args.block_size, tokenizer.vocab_size,
                             max_num_seqs=args.max_num_seqs, max_model_len=plan.max_model_len,
                             enforce_eager=args.enforce_eager, loras=loras, gemv_kernels=args.gemv_kernels,
                             kv_dtype=kv_dtype)
    else:
        tp.build_runners(plan.num_blocks, args.block_size, tokenizer.vocab_size, kv_dtype)
        runner = tp
        log.info("model runner: %s", runner)
    limits = args.scheduler_config(plan.max_model_len, device)
    log.info("model %s (%s) on %s; KV cache %d blocks of %d tokens (%.2f GiB of %s%s); steps of up to %d tokens",
             cfg.variant, dtype, device, plan.num_blocks, args.block_size,
             plan.num_blocks * args.block_size * token_bytes / 2**30, str(kv_dtype).removeprefix("torch."),
             " on each rank" if tp is not None else "", limits.max_num_batched_tokens)
    if args.speculative_config is not None:
        spec = args.speculative_config
        log.info("speculative decoding: %s drafts of up to %d tokens from %d- to %d-grams%s", spec.method,
                 spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max,
                 f", none while over {spec.disable_by_batch_size} sequences run" if spec.disable_by_batch_size else "")
    return LLMEngine(runner, tokenizer, limits, BlockPool(plan.num_blocks, args.block_size), tokenizer.stop_token_ids,
                     vocab_size=tokenizer.vocab_size, loras=loras)


def build_engine(settings: ServerSettings):
    """-> (AsyncEngine started, Tokenizer, served model name, max_model_len)"""
    args = settings.engine_args()
    name = settings.model_name
    # built on the engine loop's own thread: torch's parallel work stays on one OpenMP team
    engine = AsyncEngine.start(lambda: build_llm_engine(args))
    return engine, engine.engine.tokenizer, name, engine.max_model_len
