"""The GPU runner: decode steps replayed from CUDA graphs, prefill and mixed steps eager.

Eager, one decode step of the 9B launches some 35 kernels per layer, 1,400 in all, and the GPU
waits on Python between them: a 40-layer step took ~50 ms on an H100 whose bandwidth allows ~5.
Captured as a CUDA graph, the step is one launch. A graph replays fixed shapes and addresses, so:
- the step's inputs are copied into the first rows of static tensors (DecodeBuffers);
- one graph is captured per batch size of a ladder and a batch is padded up to the next size; the
  padding rows write their K/V into a sink block the engine never hands out, and read only it;
- attention is paged_decode.py's kernel, whose launch does not depend on the context lengths.

Replayed, the small kernels still cost: on an H200 a 40-layer batch-1 step ran 8.2 ms of kernels,
5.1 of them the matrix products and ~3.1 the ~1,400 small ones (BENCHMARKS.md). So with `fuse` (the
default for plain weights) every step runs segments.py's pieces compiled by inductor, their small ops
fused into a few Triton kernels around the products (compiled_layers.py), each piece storing the K/V it
makes in the cache (no kernels of their own): decode graphs capture them, with the split-merge of
the attention kernel (paged_decode.merge_splits) folded into the piece after it; prefill and mixed
steps run them eagerly around attention.cached_attention. One compile serves every layer and every
number of rows (a dynamic dimension; one row compiles once more). Without `fuse` the model's own
forward (glm4.py) runs, captured as is for decodes. Steps with prompt tokens, and batches larger than
the ladder, are not replayed; with `capture=False` no step is, and decode steps run the same code
through the same static buffers (how the CPU tests check the padding, the buffers and the compiled
pieces: the kernel in Triton's interpreter, the pieces compiled by inductor for the CPU).

With `one_row`, the batch-1 decode graph's products with the linears it names (ONE_ROW_PRODUCTS) are
not cuBLAS's kernels, which at batch 1 took 5.07 of a 6.58 ms step on an H200, but each the kernel it
names (RowProductLinear): inductor's reduction over the weight (None) or gemv.py's Triton kernel in
the given blocks. make_runner passes those where gemv.py's kernel beat cuBLAS's on this GPU at load
(one_row.fastest_one_row_kernels); `bench_gpu.py` times all three for each product. With `fold`
(the default), and all four of every layer's linears on gemv.py's kernel in `one_row` or in
`fold_with` (its best blocks for each, whatever cuBLAS's time), the batch-1 graph runs one_row.py's
folded pieces: that kernel does the small ops around its products, 6 launches a layer instead of 11.
Captured, the batch-1 step is captured both ways (folded on `fold_with`'s kernels, not on `one_row`'s)
and the faster replay kept. On sm_90 and newer the batch-1 step's kernels are launched with
programmatic dependent launch (gemv.py's, the attention kernel, and inductor's in the folded pieces),
each one's programs started before the one before has ended and waiting on the GPU for its writes.
None of these kernels is trusted on a GPU it has not met: the batch-1 graph kept is checked at load
against the model as written (check_batch1), and one whose logits are not the model's gives up what
it runs beyond the layers as written, a stage at a time (_fall_back), until one is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch

from . import gemv
from .attention import AttentionBatch
from .batch import ForwardBatch, ScheduledBatch, SeqChunk, build_batch
from .compiled_layers import CompiledLayers, compile_piece
from .glm4 import GLM4Model
from .lora import LoRASet
from .one_row import FOLDED_PRODUCTS, ONE_ROW_PRODUCTS, Folded, can_fold, swap_row_product_linears
from .runner import EagerRunner

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # up to max_num_seqs, which is always one
# check_batch1: the least cosine of the batch-1 step's logits to the model's as written. Two correct
# bf16 orders of the same sums land near 1 (ours against transformers over 40 layers: 0.997); a kernel
# that reads or writes the wrong thing lands far below.
BATCH1_MIN_COSINE = 0.98


class WrongLogits(RuntimeError):
    """A captured step's logits are not the model's as written."""


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
        # through NumPy: torch.tensor of nested lists costs ~3x as much host time, which the GPU waits for
        self.meta[:, :size].copy_(torch.from_numpy(np.array(meta, dtype=np.int64)), non_blocking=True)
        needed = [-(-(c.start + 1) // bs) for c in chunks]  # blocks each context covers
        width = max(needed + [1])
        tables = [c.block_table[:n] + [self.sink_block] * (width - n) for c, n in zip(chunks, needed)]
        tables += [[self.sink_block] * width] * pad
        self.block_tables[:size, :width].copy_(torch.from_numpy(np.array(tables, dtype=np.int64)), non_blocking=True)

    def step_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """input_ids, positions, attention batch and logits rows of a `size`-row step: views, so that a
        captured graph reads what `fill` copies in later."""
        ids, positions, slots, lens = self.meta[:, :size]  # [size] each
        attn = AttentionBatch(slot_mapping=slots, decode_block_tables=self.block_tables[:size],
                              decode_context_lens=lens, paged_decode=True)
        return ids, positions, attn, self.logits_indices[:size]


class CudaGraphRunner(EagerRunner):
    def __init__(self, model: GLM4Model, num_blocks: int, block_size: int, vocab_limit: int | None,
                 max_num_seqs: int, max_model_len: int, capture: bool = True, fuse: bool = True,
                 one_row: Mapping[str, gemv.Blocks | None] | None = None, loras: LoRASet | None = None,
                 fold: bool = True, fold_with: Mapping[str, gemv.Blocks] | None = None):
        # one block more than the engine's: the padding rows' sink
        super().__init__(model, num_blocks + 1, block_size, vocab_limit, paged_decode=True)
        self.num_blocks = num_blocks
        self.sizes = graph_batch_sizes(max_num_seqs)
        width = -(-max_model_len // block_size)
        self.buffers = DecodeBuffers(self.sizes[-1], width, block_size, num_blocks, self.device)
        if loras is not None:  # a fixed set, in slots: the graphs hold every adapter's products
            loras.attach(model, slotted=True)
            self.loras = loras
            # each row's choice of adapter, read by the graphs as they read the other inputs
            self.lora_choice = torch.zeros(self.sizes[-1], len(loras.adapters), dtype=self.dtype, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.fused = CompiledLayers() if fuse else None
        # the batch-1 step's kernels (one-row products, attention, the folded pieces' own) launched with
        # programmatic dependent launch, where the GPU has it
        self.pdl = True
        # the batch-1 graph's products by gemv.py's kernel: `one_row`'s; folded, also `fold_with`'s for a
        # layer's four (the kernel's best blocks for each, where cuBLAS's product was faster alone too)
        self.one_row = dict(one_row or {}) if fuse else {}
        self.fold_with = {**self.one_row, **{n: b for n, b in (fold_with or {}).items() if n in FOLDED_PRODUCTS}}
        self.swapped: list = []
        self.folded = False  # the batch-1 step's small ops in gemv.py's kernel (one_row.py)
        if fuse and fold:
            self._use(self.fold_with)
            self.folded = can_fold(model)
        if not self.folded:
            self._use(self.one_row)
        self.step_ms: dict[str, float] = {}  # the batch-1 step's replay, folded and not, where both were captured
        self.batch1_check: dict = {}  # the kept batch-1 graph against the model as written (check_batch1)
        if capture:
            self._capture()

    def __repr__(self) -> str:
        how = f"CUDA graphs for {len(self.graphs)} batch sizes up to {self.sizes[-1]}" if self.graphs else "no graphs"
        layers = ", layers compiled by inductor" if self.fused else ""
        kernels = self.one_row_kernels()
        named = " ".join(f"{n} ({k})" for n, k in kernels.items())
        rows = f", one-row products: {named}" if kernels else ""
        rows += ", their small ops folded in" if self.fused and self.folded else ""
        adapters = f", LoRA adapters in slots: {' '.join(self.loras.adapters)}" if self.loras is not None else ""
        return f"CudaGraphRunner({self.dtype}, {how}{layers}{rows}{adapters}, paged decode attention in Triton)"

    def one_row_kernels(self) -> dict[str, str]:
        """The batch-1 graph's products not cuBLAS's: linear name -> its kernel ("Triton 8x512/4w", "reduction")."""
        if not self.fused:
            return {}
        kernels = {name: getattr(parent, name).kernel() for parent, name, _ in self.swapped}
        return {n: kernels[n] for n in sorted(kernels, key=ONE_ROW_PRODUCTS.index)}

    def close(self) -> None:
        """The model's own linears back in place (a later runner of the same model gets them)."""
        for parent, name, linear in self.swapped:
            setattr(parent, name, linear)
        self.swapped, self.folded = [], False

    def _use_folded(self, folded: bool) -> None:
        """The linears as the batch-1 step takes them folded (`fold_with`'s kernels) or not (`one_row`'s)."""
        self._use(self.fold_with if folded else self.one_row)
        self.folded = folded

    def _use(self, kernels: Mapping[str, gemv.Blocks | None]) -> None:
        """The model's linears named in `kernels` on those one-row kernels, the others its own."""
        self.close()
        self.swapped = swap_row_product_linears(self.model, kernels)
        for parent, name, _ in self.swapped:
            getattr(parent, name).pdl = self.pdl

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        chunks = batch.chunks
        if not chunks or len(chunks) > self.sizes[-1] or any(len(c.token_ids) != 1 or c.num_logit_rows != 1
                                                             for c in chunks):
            return super().execute(batch)
        self.kv.copy_blocks(batch.block_copies)
        size = next(s for s in self.sizes if s >= len(chunks))
        self.buffers.fill(chunks, size)
        self._choose_loras(chunks, size)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self._step(size)
        # a copy: the graph's output tensor is overwritten by the next replay
        return logits[: len(chunks), : self.vocab_limit].clone()

    def forward(self, b: ForwardBatch) -> torch.Tensor:
        """The steps not replayed from a graph (prompt tokens, batches past the ladder)."""
        if self.fused is not None:
            if self.loras is not None:
                self.loras.select(b.lora_rows, b.input_ids.shape[0])
            return self.fused.forward(self.model, b, self.kv)
        return super().forward(b)

    def _choose_loras(self, chunks: list[SeqChunk], size: int) -> None:
        """A decode step's rows' adapters into the graphs' buffer (the padding rows: the base model's)."""
        if self.loras is not None:
            rows = [(c.lora, i, i + 1) for i, c in enumerate(chunks) if c.lora is not None]
            self.loras.slots.choose(rows, self.lora_choice[:size])

    def _step(self, size: int) -> torch.Tensor:
        ids, positions, attn, rows = self.buffers.step_inputs(size)
        if self.fused is not None:
            # every row's logits: rows is 0..size-1
            return self.fused.decode(self.model, ids, positions, attn, self.kv, folded=self.folded and size == 1,
                                     pdl=self.pdl and size == 1)
        return self.model(ids, positions, attn, self.kv, rows)  # [size, V] fp32

    def _warm_up(self, size: int) -> None:
        """One step of `size` rows; a compile that fails (inductor or Triton on this machine) leaves the
        layers as written, loudly, rather than no server."""
        try:
            self._step(size)
        except Exception as e:
            self._fall_back(f"compiling the decode step of {size} rows", e, one_row=size == 1)
            self._warm_up(size)

    def _fall_back(self, what: str, error: Exception, one_row: bool = True) -> None:
        """After `what` failed, the first of these that was in use is given up: programmatic dependent
        launch of the batch-1 step's kernels; the folded batch-1 step (one_row.py); the one-row kernels
        (cuBLAS's products in their place); the compiled layers (the layers as written). Raise if none
        was. Not `one_row` (a step of more rows, which runs none of the first three): the compiled
        layers first."""
        why, error_text = f"{what} failed", f"{type(error).__name__}: {error}"
        if one_row and self._launches_pdl():
            log.warning("%s with the batch-1 step's kernels launched with PDL, launched without it now: %s", why,
                        error_text)
            self.pdl = False
            for parent, name, _ in self.swapped:
                getattr(parent, name).pdl = False
            self.fused.folded_pieces = Folded(compile_piece)
        elif one_row and self.folded:
            log.warning("%s with the batch-1 step folded, not folded now: %s", why, error_text)
            self._use_folded(False)
            self.fold_with = self.one_row
        elif one_row and self.swapped:
            log.warning("%s with the one-row kernels, cuBLAS's products take their place: %s", why, error_text)
            self.close()
            self.one_row = self.fold_with = {}
        elif self.fused is not None:
            log.warning("%s, the graphs capture the layers as written: %s", why, error_text)
            self.fused, self.folded = None, False
        else:
            raise error

    def _launches_pdl(self) -> bool:
        """Whether the batch-1 step's kernels launch with PDL: its compiled pieces', on sm_90 and newer."""
        return self.pdl and self.fused is not None and gemv.launches_pdl(self.device)

    def _warm_up_prompt_steps(self) -> None:
        """Compile the pieces of prompt steps now, not on the first request: two spans of the sink block
        (a second number of rows makes the rows dynamic), writing only there. A failed compile leaves
        those steps to the layers as written; the decode graphs keep what they captured."""
        sink, bs = self.num_blocks, self.block_size
        try:
            for n in (bs, bs - 1):
                self.execute(ScheduledBatch([SeqChunk([0] * n, 0, [sink])]))
        except Exception as e:
            log.warning("compiling the prompt steps failed, they run the layers as written: %s: %s",
                        type(e).__name__, e)
            self.fused = None

    def _capture(self) -> None:
        """A capture of the compiled layers that fails (a kernel the graph cannot hold), or whose batch-1
        step's logits are not the model's, leaves the graphs to cuBLAS's products if one-row kernels were
        in them, else to the layers as written (_fall_back); loudly, rather than no server."""
        log.info("%scapturing CUDA graphs for batch sizes %s", "compiling the layers, " if self.fused else "",
                 self.sizes)
        try:
            self._capture_ladder()
        except Exception as e:
            self._fall_back("checking the batch-1 step against the model as written" if isinstance(e, WrongLogits)
                            else "capturing the compiled layers", e)
            self.graphs.clear()
            self._capture()

    def _capture_ladder(self) -> None:
        """Largest batch first, all graphs in one memory pool: the smaller ones fit in what it left."""
        pool = None
        for size in reversed(self.sizes):
            graph, logits = self._capture_size(size, pool)
            pool = graph.pool()
            if size == 1 and self.folded:
                graph, logits = self._folded_or_not(graph, logits, pool)
            if size == 1:
                graph, logits = self._checked_batch1(graph, logits, pool)
            self.graphs[size] = (graph, logits)
        if self.fused is not None and self.block_size >= 3:
            self._warm_up_prompt_steps()
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def _capture_size(self, size: int, pool, warm_up=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The decode step of `size` rows run once by `warm_up` (_warm_up: falls back on a failed compile),
        then captured -> (graph, its logits tensor)."""
        self.buffers.fill([], size)
        self._choose_loras([], size)
        stream = torch.cuda.Stream()  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            (warm_up or self._warm_up)(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._step(size)
        return graph, logits

    def _folded_or_not(self, graph, logits, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The batch-1 step captured folded (graph, logits, on `fold_with`'s kernels) and again not (on
        `one_row`'s): the one whose replay takes less time on this GPU (one compile more at load), the
        model's linears left as it has them; folded where the other fails to compile or capture."""
        self._use_folded(False)
        try:
            other = self._capture_size(1, pool, warm_up=self._step)
        except Exception as e:  # noqa: BLE001 - the folded step is captured already
            log.warning("capturing the batch-1 step without folding failed, folded it stays: %s: %s",
                        type(e).__name__, e)
            other = None
        if other is not None:
            self.step_ms = {"folded": replay_ms(graph), "unfolded": replay_ms(other[0])}
            log.info("batch-1 step: %.3f ms folded, %.3f ms not", self.step_ms["folded"], self.step_ms["unfolded"])
            if self.step_ms["unfolded"] < self.step_ms["folded"]:
                return other
        self._use_folded(True)
        return graph, logits

    def _checked_batch1(self, graph, logits, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The batch-1 graph, or the one captured after giving up what it ran of its own (PDL, folding,
        the one-row kernels: _fall_back) until its logits are the model's (check_batch1). WrongLogits
        when they are not with none of those left: the compiled layers' to give up, for every size."""
        while True:
            self.batch1_check = self.check_batch1(lambda: (graph.replay(), logits)[1])
            if self.batch1_check["ok"]:
                log.info("batch-1 step checked against the model as written: cosine %.5f, max relative difference "
                         "%.2e", self.batch1_check["cosine"], self.batch1_check["max_rel_diff"])
                return graph, logits
            wrong = WrongLogits(f"the batch-1 step's logits are not the model's as written: cosine "
                                f"{self.batch1_check['cosine']:.4f} (at least {BATCH1_MIN_COSINE} expected)")
            if not (self.folded or self.swapped or self._launches_pdl()):
                raise wrong
            self._fall_back("checking the batch-1 step against the model as written", wrong)
            graph, logits = self._capture_size(1, pool)

    def check_batch1(self, step: Callable[[], torch.Tensor]) -> dict:
        """The logits of the batch-1 decode step that `step` runs (a graph's replay, or _step(1)) from
        the buffers, against the model's as written (its own linears, attention in PyTorch) for the same
        token: one at the last slot of the sink block, after a prompt that fills the rest (a position
        past 0, where the rotary turns), its own K/V poisoned with nan before `step` (a step that does
        not store them reads nan) -> {"cosine", "max_rel_diff", "ok"}. It writes only the sink block,
        the padding rows' own."""
        sink, bs = self.num_blocks, self.block_size
        ids = [(31 * i + 7) % self.vocab_limit for i in range(bs)]
        chunk, slot = SeqChunk(ids[-1:], bs - 1, [sink]), sink * bs + bs - 1
        with torch.inference_mode():
            if bs > 1:  # the prompt's K/V, for the token to attend to
                with self.linears_as_written():
                    EagerRunner.forward(self, build_batch([SeqChunk(ids[:-1], 0, [sink])], bs, self.device))
            for k_slots, v_slots in zip(self.kv.k_slots, self.kv.v_slots):
                k_slots[slot], v_slots[slot] = float("nan"), float("nan")
            self.buffers.fill([chunk], 1)
            self._choose_loras([], 1)  # the base model's row, as the reference's
            got = step()[0].float().clone()  # [V]
            self.buffers.fill([], 1)
            with self.linears_as_written():
                want = EagerRunner.forward(self, build_batch([chunk], bs, self.device))[0].float()  # [V]
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        if not torch.isfinite(want).all():  # the model's own logits leave nothing to compare with
            log.warning("the model's own logits are not finite: the batch-1 step is kept unchecked")
            return {"cosine": cosine, "max_rel_diff": rel, "ok": True, "reference_finite": False}
        return {"cosine": cosine, "max_rel_diff": rel, "ok": cosine >= BATCH1_MIN_COSINE}  # nan is not ok

    @contextlib.contextmanager
    def linears_as_written(self):
        """The model's own linears in place for the block's time, then the runner's again: for
        check_batch1's reference, or another runner made on the same model meanwhile (the graphs
        captured already keep their kernels)."""
        folded = self.folded
        self._use({})
        try:
            yield
        finally:
            self._use_folded(folded)


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """A captured step's time on the GPU, ms a replay: the median of `replays` after one to warm."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
