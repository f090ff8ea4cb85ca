"""Tensor parallelism over torch.distributed: one model split across `world` processes (shard.py).

The server's process is rank 0: it runs the engine, and its runner broadcasts each step's batch to
the other ranks, worker processes it starts itself. Every rank runs the same forward over its part of
the weights and its own KV heads; forward hooks on the row-parallel linears all-reduce their partial
sums, and the vocabulary-parallel output layer's logits are gathered. NCCL between GPUs (rank r on
cuda:r), gloo on CPU.

A worker that dies takes the server down with it: rank 0 cannot leave a collective its peer will never
join, so a watcher ends the process (exit status 1) instead of letting it hang. Workers end with their
parent (PR_SET_PDEATHSIG) and leave Ctrl-C to it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .batch import ScheduledBatch
from .config import ModelConfig
from .glm4 import GLM4Model, load_model
from .shard import Shard

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a 128K prefill step on a CPU can take minutes


def install_collectives(model: GLM4Model) -> None:
    """Combine the ranks' parts: sum the row-parallel products (o, down), gather the logits."""
    for layer in model.layers:
        layer.attn.o.register_forward_hook(_all_reduce)
        layer.mlp.down.register_forward_hook(_all_reduce)
    model.lm_head.register_forward_hook(_all_gather_last_dim)


def _all_reduce(module, inputs, out: torch.Tensor) -> torch.Tensor:
    if out.device.type == "cpu" and out.dtype != torch.float32:  # gloo sums fp32; the result rounds back
        total = out.float()
        dist.all_reduce(total)
        return total.to(out.dtype)
    dist.all_reduce(out)
    return out


def _all_gather_last_dim(module, inputs, out: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, out.contiguous())
    return torch.cat(parts, dim=-1)  # [rows, vocab]: the ranks hold consecutive vocabulary ranges


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to build its part (plain values: it crosses to the worker processes)."""

    path: str
    dtype: str
    device: str  # "cpu" or "cuda"
    quantization: str | None
    world: int
    init_method: str  # tcp://127.0.0.1:port
    hf_overrides: dict | None = None  # keys of config.json replaced (ModelConfig.from_dir)

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else "cpu"


def _join(spec: RankSpec, rank: int) -> GLM4Model:
    """Join the process group and load this rank's part of the model."""
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    dist.init_process_group("nccl" if spec.device == "cuda" else "gloo", init_method=spec.init_method, rank=rank,
                            world_size=spec.world, timeout=COLLECTIVE_TIMEOUT)
    return load_model(spec.path, spec.dtype, spec.device_of(rank), quantization=spec.quantization,
                      shard=Shard(rank, spec.world), hf_overrides=spec.hf_overrides)


def _rank_runner(model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int, kv_dtype: torch.dtype):
    from .runner import make_runner

    runner = make_runner(model, num_blocks, block_size, vocab_limit, kv_dtype=kv_dtype)
    install_collectives(model)  # on the runner's own modules (it may swap the linears)
    return runner


def worker_main(spec: RankSpec, rank: int) -> None:
    """Ranks 1..world-1: follow rank 0's batches until it sends None."""
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server, whatever killed it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    model = _join(spec, rank)
    plan = [None]
    dist.broadcast_object_list(plan, src=0)  # (num_blocks, block_size, vocab_limit, kv_dtype), planned by rank 0
    runner = _rank_runner(model, *plan[0])
    while True:
        batch = [None]
        dist.broadcast_object_list(batch, src=0)
        if batch[0] is None:
            break
        runner.execute(batch[0])  # its logits are rank 0's; the collectives keep the ranks in step
    dist.destroy_process_group()


class TensorParallelRunner:
    """Rank 0's runner: the ModelRunner interface over all the ranks. Build it in two steps, as the
    engine's planning needs: `start` loads rank 0's part (the others load theirs meanwhile), then
    `build_runners` once the KV cache is planned."""

    def __init__(self, spec: RankSpec, model: GLM4Model, workers: list):
        self.spec, self.model, self.workers = spec, model, workers
        self.runner = None
        self.num_blocks = self.block_size = 0
        self._closing = False
        threading.Thread(target=self._watch, name="glm4serve-tp-watch", daemon=True).start()

    @classmethod
    def start(cls, path, dtype: str, device: str, quantization: str | None, world: int,
              hf_overrides: dict | None = None) -> TensorParallelRunner:
        Shard(0, world).check(ModelConfig.from_dir(path, hf_overrides))  # before any process starts
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = RankSpec(str(path), dtype, device, quantization, world, f"tcp://127.0.0.1:{port}", hf_overrides)
        ctx = torch.multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=worker_main, args=(spec, rank), name=f"glm4serve-tp{rank}", daemon=True)
                   for rank in range(1, world)]
        for w in workers:
            w.start()
        return cls(spec, _join(spec, 0), workers)

    def build_runners(self, num_blocks: int, block_size: int, vocab_limit: int, kv_dtype: torch.dtype) -> None:
        dist.broadcast_object_list([(num_blocks, block_size, vocab_limit, kv_dtype)], src=0)
        self.runner = _rank_runner(self.model, num_blocks, block_size, vocab_limit, kv_dtype)
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        dist.broadcast_object_list([batch], src=0)
        return self.runner.execute(batch)

    def close(self) -> None:
        self._closing = True
        if self.runner is not None:
            dist.broadcast_object_list([None], src=0)
        for w in self.workers:
            w.join(10)
        dist.destroy_process_group()

    def __repr__(self) -> str:
        return f"TensorParallelRunner({self.spec.world} ranks, {self.spec.device}; rank 0: {self.runner!r})"

    def _watch(self) -> None:
        while not self._closing:
            for w in self.workers:
                if w.exitcode is not None and not self._closing:
                    log.critical("tensor-parallel rank %s died (exit code %s): the server stops", w.name, w.exitcode)
                    logging.shutdown()
                    os._exit(1)
            time.sleep(0.2)
