"""llama.cpp's common block types widened to float32 in torch: the same numbers as gguf's numpy `dequantize`
(each value computed by the same float32 operations in the same order), 5-15x faster on a CPU's cores, which
makes loading a 9B GGUF file a matter of its reads. Other types go through gguf's numpy code (gguf_file.py).

Each takes the rows of a matrix as stored (uint8 [rows, bytes a row]) and gives float32 [rows, columns]. A row
is a run of blocks: of 32 weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or of 256 in 8 or 16 sub-blocks (Q4_K, Q5_K,
Q6_K), the layouts of ggml-common.h.
"""

from __future__ import annotations

import torch

QK = 32  # weights a Q*_0 / Q*_1 block
QK_K = 256  # weights a K-quant super-block


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1] float32 of the float16 they hold."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] bytes -> [n, 2 m]: the m low nibbles, then the m high ones (ggml's order within a block)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, count] its bits 0..count-1 as 0/1 uint8."""
    word = qh.contiguous().view(torch.int32)  # [n, 1]; bit 31 lands in the sign, which >> & 1 keeps apart
    return ((word >> torch.arange(count, dtype=torch.int32)) & 1).to(torch.uint8)


def q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, x = blocks[:, :2], blocks[:, 2:]
    return x.contiguous().view(torch.int8).float() * _f16(d)


def q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = blocks[:, :2], blocks[:, 2:]
    return _f16(d) * (_nibbles(qs).to(torch.int8) - 8).float()


def q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = blocks[:, :2], blocks[:, 2:4], blocks[:, 4:]
    return _f16(d) * _nibbles(qs).float() + _f16(m)


def q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = blocks[:, :2], blocks[:, 2:6], blocks[:, 6:]
    q = _nibbles(qs) | (_bits(qh, QK) << 4)
    return _f16(d) * (q.to(torch.int8) - 16).float()


def q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = blocks[:, :2], blocks[:, 2:4], blocks[:, 4:8], blocks[:, 8:]
    q = _nibbles(qs) | (_bits(qh, QK) << 4)
    return _f16(d) * q.float() + _f16(m)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins ([n, 8] each)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mins


def q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qs = blocks[:, :2], blocks[:, 2:4], blocks[:, 4:16], blocks[:, 16:]
    sc, m = _k_scales(scales)
    d = (_f16(d) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(dmin) * m.float()).reshape(n, 8, 1)
    q = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32).float()  # 32 bytes give sub-blocks 2j and 2j + 1
    return (d * q - dm).reshape(n, QK_K)


def q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales = blocks[:, :2], blocks[:, 2:4], blocks[:, 4:16]
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    sc, m = _k_scales(scales)
    d = (_f16(d) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(dmin) * m.float()).reshape(n, 8, 1)
    ql = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (qh.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1  # sub-block j: bit j
    return (d * (ql | (high << 4)).float() - dm).reshape(n, QK_K)


def q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:]
    d = (_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)  # 64 bytes give four runs of 32: low nibbles, then high
    high = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def q4_0_codes(blocks: torch.Tensor):
    d, qs = blocks[:, :2], blocks[:, 2:]
    return _nibbles(qs), _f16(d), torch.zeros(blocks.shape[0], 1)  # d (q - 8)


def q4_1_codes(blocks: torch.Tensor):
    d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
    return _nibbles(qs), d, m + 8 * d  # d q + m = d (q - 8) + (m + 8 d)


def q4_k_codes(blocks: torch.Tensor):
    n = blocks.shape[0]
    d, dmin, scales, qs = blocks[:, :2], blocks[:, 2:4], blocks[:, 4:16], blocks[:, 16:]
    sc, m = _k_scales(scales)
    scale = _f16(d) * sc.float()  # [n, 8]: a sub-block of 32 each
    q = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)
    return q.reshape(n * 8, 32), scale.reshape(-1, 1), (8 * scale - _f16(dmin) * m.float()).reshape(-1, 1)


# 4-bit block types whose blocks (or sub-blocks) are 32 weights on 16 evenly spaced levels: each is an int4 group of
# 32 of ours, w = (q - 8) * scale + zero, with the file's codes -> (bytes a block, codes of blocks)
INT4_CODES = {"Q4_0": (18, q4_0_codes), "Q4_1": (20, q4_1_codes), "Q4_K": (144, q4_k_codes)}
INT4_CODES_GROUP = QK


def int4_codes(rows: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [rows, bytes a row] of a 4-bit block type of INT4_CODES -> its codes q (uint8 [rows, columns], 0..15)
    and each group of 32's scale and zero (float32 [rows, columns / 32]), the weights (q - 8) * scale + zero: those
    `widen` gives, up to the float rounding of the regrouped terms."""
    size, fn = INT4_CODES[kind]
    n_rows, row_bytes = rows.shape
    q, scale, zero = fn(rows.reshape(-1, size))
    return q.reshape(n_rows, -1), scale.reshape(n_rows, -1), zero.reshape(n_rows, -1)


# block type name (gguf.GGMLQuantizationType) -> (weights a block, bytes a block, widening)
BLOCK_TYPES = {
    "Q8_0": (QK, 34, q8_0), "Q4_0": (QK, 18, q4_0), "Q4_1": (QK, 20, q4_1), "Q5_0": (QK, 22, q5_0),
    "Q5_1": (QK, 24, q5_1), "Q4_K": (QK_K, 144, q4_k), "Q5_K": (QK_K, 176, q5_k), "Q6_K": (QK_K, 210, q6_k),
}


def widen(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 [rows, bytes a row] of block type `kind` -> float32 [rows, columns]."""
    weights, size, fn = BLOCK_TYPES[kind]
    n_rows, row_bytes = rows.shape
    return fn(rows.reshape(-1, size)).reshape(n_rows, row_bytes // size * weights)
