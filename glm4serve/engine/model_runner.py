"""The model runner: one scheduler step in, one row of next-token logits per sampling row out."""

from __future__ import annotations

import torch

from ..model.batch import SeqChunk, build_batch
from ..model.glm4 import GLM4Model
from ..model.kv_cache import KVCache
from .scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: GLM4Model, kv: KVCache, vocab_limit: int | None = None):
        self.model = model
        self.kv = kv
        self.device = next(model.parameters()).device
        # The output layer has padding rows past the tokenizer's last id (151552 vs 151343 for
        # glm-4-9b-chat): they can never be sampled, so they are cut off here.
        self.vocab_limit = vocab_limit or model.cfg.vocab_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared partial blocks (n > 1 forks), every layer, before the forward."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for cache in self.kv.k + self.kv.v:
            cache.index_copy_(0, dst, cache.index_select(0, src))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [rows, V] float32, one row per scheduled item that samples, in scheduled order."""
        self.copy_blocks(out.block_copies)
        if not out.scheduled:
            return torch.empty(0, self.vocab_limit)
        chunks = [
            SeqChunk(
                token_ids=s.token_ids,
                start=s.start,
                block_table=s.seq.block_table,
                want_logits=bool(s.sample_for),
            )
            for s in out.scheduled
        ]
        b = build_batch(chunks, self.kv.block_size, self.device)
        logits = self.model(b.input_ids, b.positions, b.attn, self.kv, b.logits_indices)
        return logits[:, : self.vocab_limit].cpu()
