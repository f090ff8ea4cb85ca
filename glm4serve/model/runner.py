"""Model runners: one scheduled batch in, next-token logits out, behind one interface.

A runner owns the model it runs and the KV cache's tensors. Which runner serves a model is decided
once, at load (`make_runner`), and logged:
- EagerRunner: the model as written in glm4.py, on any device and dtype;
- CpuRunner (cpu_runner.py): fp32, bf16, int8 and int4 on CPU: oneDNN-packed or quantized linears,
  and in fp32 one decoding sequence's step compiled by inductor;
- CudaGraphRunner (cuda_runner.py): on a GPU, decode steps replayed from CUDA graphs, attention
  read in place by a Triton kernel.

Logits stay on the runner's device: the sampler runs there, and only token ids (and the logprobs
asked for) cross to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from .batch import ForwardBatch, ScheduledBatch, build_batch
from .glm4 import GLM4Model
from .kv_cache import KVCache
from .lora import LoRASet

log = logging.getLogger(__name__)


class ModelRunner(Protocol):
    num_blocks: int  # KV cache blocks it holds
    block_size: int  # token slots per block

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Copy batch.block_copies, run the forward; float32 logits [rows, vocab] on the runner's device,
        one row per chunk that wants logits, in the chunks' order."""
        ...

    def close(self) -> None:
        """Let go of what it holds beyond memory (worker processes); called once, at shutdown."""
        ...


class EagerRunner:
    """The model as written, eager PyTorch, on its device; with `paged_decode`, decodes attend through
    paged_decode.py's kernel."""

    def __init__(self, model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int | None = None,
                 kv_zeros: Callable[[tuple, torch.dtype], torch.Tensor] | None = None, paged_decode: bool = False,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_dtype = kv_dtype or self.dtype  # the cache's elements: the model's dtype, or fp8 (kv_cache.py)
        self.kv = KVCache(model.cfg, num_blocks, block_size, self.kv_dtype, self.device, zeros=kv_zeros,
                          shard=model.shard)
        self.num_blocks, self.block_size = num_blocks, block_size
        # The output layer has padding rows past the tokenizer's last id (151552 vs 151343 for
        # glm-4-9b-chat): they can never be sampled, so they are cut off here.
        self.vocab_limit = vocab_limit or model.cfg.vocab_size
        self.paged_decode = paged_decode
        self.loras: LoRASet | None = None  # LoRA adapters (make_runner attaches them), told each step's rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.kv.copy_blocks(batch.block_copies)
        if not batch.chunks:
            return torch.empty(0, self.vocab_limit, device=self.device)
        logits = self.forward(build_batch(batch.chunks, self.block_size, self.device, self.paged_decode))
        return logits[:, : self.vocab_limit]

    def forward(self, b: ForwardBatch) -> torch.Tensor:
        if self.loras is not None:
            self.loras.select(b.lora_rows, b.input_ids.shape[0])
        return self.model(b.input_ids, b.positions, b.attn, self.kv, b.logits_indices)

    def close(self) -> None:
        pass


def make_runner(model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int | None = None, *,
                max_num_seqs: int | None = None, max_model_len: int | None = None,
                enforce_eager: bool = False, loras: LoRASet | None = None, gemv_kernels: bool = True,
                kv_dtype: torch.dtype | None = None) -> ModelRunner:
    """The fastest runner for this model where it runs:
    - CPU: fp32 and bf16 models (where this torch has oneDNN's linear packing) and quantized ones get
      the CPU runner;
    - GPU: the CUDA graph runner, for batches of up to max_num_seqs sequences of up to max_model_len
      tokens, its layers compiled by inductor for plain weights (unless those are not given, or
      `enforce_eager`, or under tensor parallelism: those steps run eagerly; all with Triton's decode
      attention where Triton is installed); with `gemv_kernels`, its batch-1 step's matrix products
      by gemv.py's kernel where that beats cuBLAS's, timed on this GPU now;
    - everything else: the eager runner.
    The KV cache holds kv_dtype (default: the model's dtype); fp8 only on CPU.
    LoRA adapters wrap the linears of whichever runner it is. A fixed set of them (none loaded or
    unloaded while serving) the CUDA graph runner holds in slots that its graphs capture (lora.LoRASlots);
    otherwise, as on CPU, no step with them is compiled or captured (their rows change every step)."""
    from .cpu_linear import packing_available
    from .paged_decode import unsupported
    from .quant import is_quantized

    param = next(model.parameters())
    if kv_dtype not in (None, param.dtype) and param.device.type != "cpu":
        raise ValueError(f"a KV cache of {kv_dtype} runs on CPU only for now")
    packable = param.dtype in (torch.float32, torch.bfloat16) and packing_available()
    on_gpu = param.device.type == "cuda"
    why_not = unsupported(model.cfg.head_dim) if on_gpu else None
    if why_not:
        log.warning("no paged decode kernel (%s): decode attends through PyTorch, without CUDA graphs, "
                    "several times slower", why_not)
    paged_decode = on_gpu and not why_not
    if param.device.type == "cpu" and (is_quantized(model) or packable):
        from .cpu_runner import CpuRunner

        runner = CpuRunner(model, num_blocks, block_size, vocab_limit, compile_decode=loras is None,
                           kv_dtype=kv_dtype)
    elif (paged_decode and max_num_seqs and max_model_len and not enforce_eager and model.shard.world == 1
          and (loras is None or loras.fixed)):
        from .cuda_runner import CudaGraphRunner
        from .one_row import fastest_one_row_kernels

        fuse = not is_quantized(model)  # quantized linears (quant.py) stay out of inductor's graphs
        # timed before the runner takes its KV cache: the timing's graphs need a little memory
        one_row, fold_with = fastest_one_row_kernels(model) if fuse and gemv_kernels else (None, None)
        runner = CudaGraphRunner(model, num_blocks, block_size, vocab_limit, max_num_seqs, max_model_len,
                                 fuse=fuse, one_row=one_row, loras=loras, fold_with=fold_with)
    else:
        runner = EagerRunner(model, num_blocks, block_size, vocab_limit, paged_decode=paged_decode, kv_dtype=kv_dtype)
    if loras is not None and runner.loras is None:  # the CUDA graph runner has them in its graphs already
        loras.attach(model)
        runner.loras = loras
    adapters = f", LoRA adapters: {', '.join(loras.adapters) or 'none yet'}" if loras else ""
    log.info("model runner: %s%s", runner, adapters)
    return runner
