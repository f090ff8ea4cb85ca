"""The GPU runner: decode steps replayed from CUDA graphs, prefill and mixed steps eager.

Eager, one decode step of the 9B launches some 15 kernels per layer, 600 in all, and the GPU
waits on Python between them: a 40-layer step took ~50 ms on an H100 whose bandwidth allows ~5.
Captured as a CUDA graph, the step is one launch. A graph replays fixed shapes and addresses, so:
- the step's inputs are copied into the first rows of static tensors (DecodeBuffers);
- one graph is captured per batch size of a ladder and a batch is padded up to the next size; the
  padding rows write their K/V into a sink block the engine never hands out, and read only it;
- attention is paged_decode.py's kernel, whose launch does not depend on the context lengths.

The graph runs the model's own forward (glm4.py), captured as is. Steps with prompt tokens, and
batches larger than the ladder, run eagerly; with `capture=False` every step does, through the
same static buffers (how the CPU tests check the padding and the buffers, in Triton's interpreter).
"""

from __future__ import annotations

import logging

import torch

from .attention import AttentionBatch
from .batch import ScheduledBatch, SeqChunk, build_batch
from .glm4 import GLM4Model
from .runner import EagerRunner

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # up to max_num_seqs, which is always one


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return [s for s in BATCH_SIZES if s < max_num_seqs] + [max_num_seqs]


class DecodeBuffers:
    """The tensors a captured decode step reads. Rows past the step's sequences are padding: token 0
    at position 0, written to and reading only the sink block's first slot."""

    def __init__(self, rows: int, width: int, block_size: int, sink_block: int, device):
        self.block_size, self.sink_block = block_size, sink_block
        # ids, positions, cache slots, context lengths: one tensor, filled by one copy per step
        self.meta = torch.zeros(4, rows, dtype=torch.long, device=device)  # [4, rows]
        self.block_tables = torch.full((rows, width), sink_block, dtype=torch.long, device=device)  # [rows, width]
        self.logits_indices = torch.arange(rows, device=device)
        self.fill([], rows)

    def fill(self, chunks: list[SeqChunk], size: int) -> None:
        """The one-token chunks' inputs into rows [0, len(chunks)); rows up to `size` become padding."""
        bs, pad = self.block_size, size - len(chunks)
        slots = [c.block_table[c.start // bs] * bs + c.start % bs for c in chunks]
        meta = [[c.token_ids[0] for c in chunks] + [0] * pad, [c.start for c in chunks] + [0] * pad,
                slots + [self.sink_block * bs] * pad, [c.start + 1 for c in chunks] + [1] * pad]
        self.meta[:, :size].copy_(torch.tensor(meta, dtype=torch.long), non_blocking=True)
        needed = [-(-(c.start + 1) // bs) for c in chunks]  # blocks each context covers
        width = max(needed + [1])
        tables = [c.block_table[:n] + [self.sink_block] * (width - n) for c, n in zip(chunks, needed)]
        tables += [[self.sink_block] * width] * pad
        self.block_tables[:size, :width].copy_(torch.tensor(tables, dtype=torch.long), non_blocking=True)

    def step_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """input_ids, positions, attention batch and logits rows of a `size`-row step: views, so that a
        captured graph reads what `fill` copies in later."""
        ids, positions, slots, lens = self.meta[:, :size]  # [size] each
        attn = AttentionBatch(slot_mapping=slots, decode_block_tables=self.block_tables[:size],
                              decode_context_lens=lens, paged_decode=True)
        return ids, positions, attn, self.logits_indices[:size]


class CudaGraphRunner(EagerRunner):
    def __init__(self, model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int | None,
                 max_num_seqs: int, max_model_len: int, capture: bool = True):
        # one block more than the engine's: the padding rows' sink
        super().__init__(model, num_blocks + 1, block_size, vocab_limit, paged_decode=True)
        self.num_blocks = num_blocks
        self.sizes = graph_batch_sizes(max_num_seqs)
        width = -(-max_model_len // block_size)
        self.buffers = DecodeBuffers(self.sizes[-1], width, block_size, num_blocks, self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def __repr__(self) -> str:
        how = f"CUDA graphs for {len(self.graphs)} batch sizes up to {self.sizes[-1]}" if self.graphs else "no graphs"
        return f"CudaGraphRunner({self.dtype}, {how}, paged decode attention in Triton)"

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        chunks = batch.chunks
        if not chunks or len(chunks) > self.sizes[-1] or any(len(c.token_ids) != 1 or c.num_logit_rows != 1
                                                             for c in chunks):
            return super().execute(batch)
        self.kv.copy_blocks(batch.block_copies)
        size = next(s for s in self.sizes if s >= len(chunks))
        self.buffers.fill(chunks, size)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self._step(size)
        # a copy: the graph's output tensor is overwritten by the next replay
        return logits[: len(chunks), : self.vocab_limit].clone()

    def _step(self, size: int) -> torch.Tensor:
        ids, positions, attn, rows = self.buffers.step_inputs(size)
        return self.model(ids, positions, attn, self.kv, rows)  # [size, V] fp32

    def _capture(self) -> None:
        """Largest batch first, all graphs in one memory pool: the smaller ones fit in what it left."""
        pool = None
        for size in reversed(self.sizes):
            self.buffers.fill([], size)
            stream = torch.cuda.Stream()  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(size)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)
