"""The engine's own host time a decode step (scheduler, sampler, stop checks, outputs), the model's
forward made free: a runner that hands back ready logits; and the CUDA runner's host time to fill
its graph's inputs (DecodeBuffers.fill, timed on the CPU). What a GPU step costs on top of its kernels
while the GPU waits (the engine does not overlap its Python with the GPU's work).

    .venv/bin/python benchmarks/bench_step_host.py [--batch 1 64] [--vocab 1000]

A small vocabulary keeps the CPU's sampling out of the figure (on a GPU the sampler's work is the
GPU's); --vocab 151552 shows it on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glm4serve.engine.block_pool import BlockPool
from glm4serve.engine.config import EngineArgs
from glm4serve.engine.engine import LLMEngine
from glm4serve.engine.types import SamplingParams

from bench_gpu import NoTextTokenizer  # this folder: a script's sys.path

BLOCKS, BLOCK_SIZE, PROMPT = 8192, 16, 1024


class ReadyLogits:
    """A runner whose forward costs nothing: the same logits every step."""

    num_blocks, block_size = BLOCKS, BLOCK_SIZE

    def __init__(self, vocab: int):
        self.logits = torch.randn(512, vocab, generator=torch.Generator().manual_seed(0))

    def execute(self, batch):
        return self.logits[: sum(c.num_logit_rows for c in batch.chunks)]

    def close(self):
        pass


def step_ms(batch: int, vocab: int, steps: int) -> float:
    args = EngineArgs(max_num_seqs=batch, max_num_batched_tokens=8192, block_size=BLOCK_SIZE)  # else the defaults
    cfg = args.scheduler_config(PROMPT + steps + 64, "cpu")
    engine = LLMEngine(ReadyLogits(vocab), NoTextTokenizer(vocab), cfg, BlockPool(BLOCKS, BLOCK_SIZE), (), vocab_size=vocab)
    params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [(7 * j + i) % vocab for j in range(PROMPT)], params)
    for _ in range(16):  # the prefills, then decodes only
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def fill_ms(batch: int, context: int = 1100, repeats: int = 500) -> float:
    """The CUDA runner's host work to put a decode step's inputs in its graph's buffers (here on the
    CPU: the host side is what is timed), for `batch` sequences of `context` tokens."""
    from glm4serve.model.batch import SeqChunk
    from glm4serve.model.cuda_runner import DecodeBuffers

    nb = -(-context // BLOCK_SIZE) + 8
    buffers = DecodeBuffers(batch, 8192, BLOCK_SIZE, BLOCKS, "cpu")
    chunks = [SeqChunk([5], context + i, list(range(i * nb, (i + 1) * nb))) for i in range(batch)]
    for _ in range(20):
        buffers.fill(chunks, batch)
    t = time.perf_counter()
    for _ in range(repeats):
        buffers.fill(chunks, batch)
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    for batch in args.batch:
        print(f"batch {batch}, vocabulary {args.vocab}: {step_ms(batch, args.vocab, args.steps):.3f} ms a decode step, "
              f"{fill_ms(batch):.3f} ms to fill the CUDA runner's graph inputs", flush=True)


if __name__ == "__main__":
    main()
