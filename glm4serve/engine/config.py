"""The engine's settings (EngineArgs: what a user chooses, each default written here once) and what
is derived from them once the model is loaded: the KV cache plan and the scheduler's limits.

The server's settings (api/settings.py) extend EngineArgs, so every field here is also a
`glm4serve serve` flag, a GLM4SERVE_* variable and a YAML key.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

from .speculative import SpeculativeConfig

DEFAULT_CPU_KV_BYTES = 4 << 30  # like vLLM's CPU default KV space
# The demo needs 2 KiB per token: 1 GiB holds four full 131K contexts, and the first run on a
# small machine neither waits on nor needs 4 GiB of memory.
DEMO_KV_BYTES = 1 << 30
GPU_MEMORY_FRACTION = 0.9  # as vLLM's gpu_memory_utilization: weights + KV cache, the rest for activations
# max_num_batched_tokens, as vLLM's server has it: larger steps on GPUs of 70 GiB or more (H100, H200)
# but A100s, where vLLM measured them to lower throughput (its PR 17885)
STEP_TOKENS = 2048
LARGE_GPU_STEP_TOKENS = 8192
LARGE_GPU_BYTES = 70 << 30

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """2147483648, "2GiB", "1.5 GB", "512MiB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, (int, float)):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a size: use bytes or a unit like 2GiB, 512MiB")
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size <= 0:
        raise ValueError("a memory size must be positive")
    return int(size)


def parse_lora_modules(value) -> dict[str, str]:
    """vLLM's --lora-modules: "name=path" items (a list, or one string of them split by spaces or
    commas), a JSON object {name: path}, or vLLM's JSON items {"name": ..., "path": ...}."""
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip()[:1] in ("{", "[") else value.replace(",", " ").split()
    if isinstance(value, dict):
        value = [{"name": k, "path": v} for k, v in value.items()]
    modules = {}
    for item in value:
        if isinstance(item, str) and item.lstrip()[:1] == "{":
            item = json.loads(item)
        if isinstance(item, dict):
            if not {"name", "path"} <= item.keys():
                raise ValueError(f"a LoRA module {item} needs a name and a path")
            name, path = str(item["name"]), str(item["path"])
        else:
            name, sep, path = str(item).partition("=")
            if not sep:
                raise ValueError(f"a LoRA module is name=path, got {item!r}")
        if not name or not path:
            raise ValueError(f"a LoRA module needs a name and a path, got {item!r}")
        if name in modules:
            raise ValueError(f"LoRA module {name!r} given twice")
        modules[name] = path
    return modules


def json_object(name: str, value) -> dict:
    """A setting that is a JSON object (the CLI's and env's form) or a mapping (YAML); empty for none."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return value


class EngineArgs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="checkpoint folder, GGUF file or hub id (default: the built-in demo "
                                                "model)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto: the checkpoint's 16-bit dtype, else float32")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch sees a GPU")
    quantization: Literal["int8", "int4", "gguf", "none"] | None = Field(
        None, description="weight-only quantization of every linear layer while loading (CPU): int8 per output "
                          "channel, int4 in groups of 64 inputs; gguf: each matrix of a GGUF file as the nearest "
                          "of those to its block type; none: the weights as they are; default: none, but gguf for "
                          "a GGUF file of block types (Q8_0, Q4_K_M ...)")
    hf_overrides: Annotated[dict, NoDecode] = Field(
        default_factory=dict, description="keys of the checkpoint's config.json replaced, as vLLM's: a JSON object "
                                          "like {\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, "
                                          "\"original_max_position_embeddings\": 32768}} (GLM-4-0414 past 32K)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="processes the model is split across (one per GPU; on CPU they share the cores)")
    max_model_len: int | None = Field(
        None, ge=1, description="context length to serve (default: the model's, capped by the KV cache)")
    kv_cache_memory: int | None = Field(
        None, description=f"KV cache size, bytes or like 2GiB (default: {DEFAULT_CPU_KV_BYTES >> 30}GiB on CPU, "
                          f"{DEMO_KV_BYTES >> 30}GiB for the demo, on a GPU what the weights leave of "
                          "gpu_memory_utilization of its memory)")
    gpu_memory_utilization: float = Field(
        GPU_MEMORY_FRACTION, gt=0.0, le=1.0, allow_inf_nan=False,
        description="GPU: the share of its memory for the weights and the KV cache, the rest for activations (vLLM's)")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto", description="the KV cache's elements, as vLLM's: auto, the model's dtype; fp8 (fp8_e4m3), half of "
                            "bf16's bytes, values saturating at +-448, no scale (CPU only)")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV cache blocks, instead of kv_cache_memory")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one batch")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description=f"most tokens in one engine step (the prefill chunk); default: {LARGE_GPU_STEP_TOKENS} "
                                f"on a GPU of {LARGE_GPU_BYTES >> 30} GiB or more but an A100, else {STEP_TOKENS} "
                                "(vLLM's server defaults)")
    long_prefill_token_threshold: int = Field(
        0, ge=0, description="most tokens of one prompt in a step, as vLLM's: a lower value shortens the steps that "
                             "carry a long prompt's chunks, and so the wait of the sequences decoding beside it, at "
                             "a little of that prompt's own time (0: no limit but the step's)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of prompt prefixes seen before")
    enforce_eager: bool = Field(False, description="GPU: run every step eagerly, without CUDA graphs")
    gemv_kernels: bool = Field(True, description="GPU: a one-sequence decode step's matrix products by "
                               "glm4serve's Triton kernel where, timed on this GPU at load, it beats cuBLAS's")
    logprobs_mode: Literal["raw_logprobs"] = Field(
        "raw_logprobs", description="vLLM's: logprobs of the model's own distribution, before temperature, "
                                    "penalties, logit_bias, top-k/top-p and a grammar (vLLM's default, the one mode "
                                    "served)")
    seed: int | None = Field(
        None, ge=0, description="the start of the draws of requests that give no seed, as vLLM's: the same requests "
                                "in the same order draw the same (default: a random start)")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="fcfs: requests in arrival order; priority: by each request's `priority` (lower "
                            "first, then arrival), and one that outranks running ones may preempt them")

    lora_modules: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="LoRA adapters (PEFT folders) served beside the model, as vLLM's: "
                                          "name=path ... (or a JSON object); a request's `model` picks one by name")
    allow_runtime_lora_updating: bool = Field(
        False, description="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM does with "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING (steps with adapters then run uncompiled, without CUDA "
                           "graphs on a GPU)")

    speculative_config: Annotated[SpeculativeConfig | None, NoDecode] = Field(
        None, description="speculative decoding, as vLLM's: a JSON object like {\"method\": \"ngram\", "
                          "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2} "
                          "(default: none)")

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        if v is not None and not v.strip():  # GLM4SERVE_MODEL= in an .env: not the working directory
            raise ValueError("model is empty: name a checkpoint folder or hub id, or leave it unset for the demo")
        return v

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _memory_size(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_modules(cls, v):
        return parse_lora_modules(v)

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _speculative_config(cls, v):
        return SpeculativeConfig.parse(v)

    @field_validator("hf_overrides", mode="before")
    @classmethod
    def _hf_overrides(cls, v):
        return json_object("hf_overrides", v)

    def engine_args(self) -> EngineArgs:
        """Just the engine's fields (of a subclass that adds its own, like the server's settings)."""
        return EngineArgs(**{name: getattr(self, name) for name in EngineArgs.model_fields})

    def scheduler_config(self, max_model_len: int, device: str) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=step_tokens(self, device),
                               max_model_len=max_model_len, block_size=self.block_size,
                               enable_prefix_caching=self.enable_prefix_caching, policy=self.scheduling_policy,
                               long_prefill_token_threshold=self.long_prefill_token_threshold,
                               speculative=self.speculative_config)


def step_tokens(args: EngineArgs, device: str) -> int:
    """max_num_batched_tokens as set, else its default for the device (cpu or cuda)."""
    if args.max_num_batched_tokens is not None:
        return args.max_num_batched_tokens
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
        if gpu.total_memory >= LARGE_GPU_BYTES and "a100" not in gpu.name.lower():
            return LARGE_GPU_STEP_TOKENS
    return STEP_TOKENS


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences holding a seat (running, or forks waiting on a running parent)
    max_num_batched_tokens: int  # query tokens per forward
    max_model_len: int  # prompt + output tokens of one sequence
    block_size: int
    enable_prefix_caching: bool
    policy: str  # EngineArgs.scheduling_policy
    long_prefill_token_threshold: int  # most prompt tokens of one sequence a step (0: the budget's)
    speculative: SpeculativeConfig | None  # drafts for decoding sequences (speculative.py)

    def __post_init__(self):
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len, self.block_size) < 1 \
                or self.long_prefill_token_threshold < 0:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {self.policy!r}")


@dataclass(frozen=True)
class KVPlan:
    num_blocks: int
    max_model_len: int  # what the engine serves: asked for, else the model's context capped by the cache


def kv_budget(args: EngineArgs, device: str) -> int:
    """KV cache bytes. On a GPU with none set: call with the weights loaded (measured before,
    the budget would leave them no room)."""
    if args.kv_cache_memory is not None:
        return args.kv_cache_memory
    if args.model is None:
        return DEMO_KV_BYTES
    if device != "cuda":
        return DEFAULT_CPU_KV_BYTES
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    budget = int(total * args.gpu_memory_utilization) - (total - free)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                         f"{total / 2**30:.1f} GiB after loading the weights): set kv_cache_memory, or raise "
                         "gpu_memory_utilization")
    return budget


def plan_kv_cache(args: EngineArgs, model_max_len: int, bytes_per_token: int, device: str) -> KVPlan:
    """How many KV blocks the budget buys, and the context length they allow."""
    if args.num_kv_blocks and args.kv_cache_memory is not None:  # a file's memory, a flag's blocks: one wins
        logging.getLogger("glm4serve").warning("num_kv_blocks (%d) sizes the KV cache; kv_cache_memory is not used",
                                               args.num_kv_blocks)
    num_blocks = args.num_kv_blocks or kv_budget(args, device) // (bytes_per_token * args.block_size)
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {kv_budget(args, device)} bytes holds no block of {args.block_size} tokens")
    capacity = num_blocks * args.block_size
    if args.max_model_len and args.max_model_len > model_max_len:  # positions it was never trained on
        raise ValueError(f"max_model_len {args.max_model_len} is longer than the model's context of {model_max_len} "
                         f"tokens (its max_position_embeddings / seq_length)")
    if args.max_model_len and args.max_model_len > capacity:
        raise ValueError(f"max_model_len {args.max_model_len} needs more KV cache than the budget holds "
                         f"({capacity} tokens): raise kv_cache_memory or lower max_model_len")
    return KVPlan(num_blocks, args.max_model_len or min(model_max_len, capacity))
