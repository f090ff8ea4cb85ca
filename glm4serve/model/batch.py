"""The scheduler's plain-data batch ("these sequences get these new tokens"), and the flat tensors
one forward needs, built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import AttentionBatch, PackedPrefill, PrefillSpan


@dataclass
class SeqChunk:
    token_ids: list[int]  # the new tokens of this sequence in this forward
    start: int  # position of token_ids[0] (= tokens already in the cache)
    block_table: list[int]  # must cover start + len(token_ids) tokens
    want_logits: bool = True  # next-token logits after the last new token
    seq_id: int | None = None  # the engine's id of the sequence, for runners that keep per-sequence state
    all_logits: bool = False  # logits after every new token (prompt logprobs), the last one's included
    lora: str | None = None  # the LoRA adapter this sequence runs with (lora.py); None: the base model

    @property
    def num_logit_rows(self) -> int:
        return len(self.token_ids) if self.all_logits else int(self.want_logits)


@dataclass
class ScheduledBatch:
    """One engine step's work for a model runner."""

    chunks: list[SeqChunk]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV blocks, before the forward

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionBatch
    logits_indices: torch.Tensor  # [N]: each chunk's logit rows (SeqChunk.num_logit_rows), in the chunks' order
    lora_rows: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter, first row, end row) of T


def build_batch(chunks: list[SeqChunk], block_size: int, device="cpu", paged_decode: bool = False,
                pack_prefills: bool | None = None) -> ForwardBatch:
    """Multi-token chunks go first as prefill spans; single tokens are batched as decodes (through
    paged_decode.py's kernel when `paged_decode`). The spans are also packed for one varlen flash
    call (attention.PackedPrefill) if `pack_prefills`, by default on a GPU.

    A one-token chunk is a decode whatever its origin (a prompt's last chunk may be one token):
    attention only needs its position and block table.
    """
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) == 1)  # stable
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    prefills: list[PrefillSpan] = []
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    first_row: dict[int, int] = {}
    for i in order:
        c = chunks[i]
        n, end = len(c.token_ids), c.start + len(c.token_ids)
        if n == 0:
            raise ValueError("a chunk with no tokens")
        if len(c.block_table) * block_size < end:
            raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
        if n > 1:
            prefills.append(PrefillSpan(len(ids), n, end, torch.tensor(c.block_table, dtype=torch.long, device=device)))
        else:
            dec_tables.append(c.block_table)
            dec_lens.append(end)
        for p in range(c.start, end):
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
        first_row[i] = len(ids)
        ids.extend(c.token_ids)
        positions.extend(range(c.start, end))

    attn = AttentionBatch(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        prefills=prefills,
        num_prefill_tokens=sum(s.num_tokens for s in prefills),
        paged_decode=paged_decode,
    )
    if prefills and (torch.device(device).type == "cuda" if pack_prefills is None else pack_prefills):
        spans = [chunks[i] for i in order[: len(prefills)]]
        attn.packed = pack(spans, block_size, device)
    if dec_tables:
        width = -(-max(dec_lens) // block_size)  # blocks of the longest decode sequence
        padded = [t[:width] + [0] * (width - len(t[:width])) for t in dec_tables]
        attn.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=device)
        attn.decode_context_lens = torch.tensor(dec_lens, dtype=torch.long, device=device)
    rows = [r for i, c in enumerate(chunks) for r in range(first_row[i] + len(c.token_ids) - c.num_logit_rows,
                                                           first_row[i] + len(c.token_ids))]
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attn=attn,
        logits_indices=torch.tensor(rows, dtype=torch.long, device=device),
        lora_rows=_lora_rows(chunks, order, first_row),
    )


def pack(spans: list[SeqChunk], block_size: int, device) -> PackedPrefill:
    """The prefill chunks' contexts as one list of cache slots, and where each span's queries and keys
    begin in the packed rows."""
    offsets = torch.arange(block_size)
    slots, q_lens, k_lens = [], [], []
    for c in spans:
        end = c.start + len(c.token_ids)
        blocks = torch.tensor(c.block_table[: -(-end // block_size)], dtype=torch.long)
        slots.append((blocks[:, None] * block_size + offsets).flatten()[:end])  # [nb, block_size] -> [end]
        q_lens.append(len(c.token_ids))
        k_lens.append(end)
    n = len(spans)
    cu = torch.tensor([[0] + q_lens, [0] + k_lens], dtype=torch.int32).cumsum(1, dtype=torch.int32)  # [2, n + 1]
    cu = cu.flatten().to(device)  # one copy; each half contiguous, as the kernel wants
    return PackedPrefill(torch.cat(slots).to(device), cu[: n + 1], cu[n + 1 :], max(q_lens), max(k_lens))


def _lora_rows(chunks: list[SeqChunk], order: list[int], first_row: dict[int, int]) -> list[tuple[str, int, int]]:
    """The row ranges of the adapters' sequences, neighbours with the same adapter joined."""
    ranges: list[tuple[str, int, int]] = []
    for i in order:
        name, start = chunks[i].lora, first_row[i]
        if name is None:
            continue
        end = start + len(chunks[i].token_ids)
        if ranges and ranges[-1][0] == name and ranges[-1][2] == start:
            start = ranges.pop()[1]
        ranges.append((name, start, end))
    return ranges
