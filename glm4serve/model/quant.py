"""Weight-only quantized linears (CPU): int8 per output channel, int4 in groups along the input.

Weights are quantized while the checkpoint loads, one tensor at a time (loader.py calls
`load_weight_rows` with each checkpoint tensor's rows): the model's linears never exist in
bf16/fp32. Activations stay in the model's dtype; each quantized linear gives its output in its
input's dtype. The kernels:
- int8: int8_kernel.py's (activations quantized to int16 per row, integer products on AVX-512
  VNNI for one row, on AMX tiles for batches; for many rows, blocks of bf16-dequantized weights
  through oneDNN) where the CPU has AVX-512 VNNI and a C compiler exists; with AVX2 and not AVX-512,
  every row count through quant_avx2.c's kernel (the same numbers); else `_weight_int8pack_mm`
  (bf16 activations);
- int4: `_weight_int4pack_mm_for_cpu` over torch's packed int4 layout (bf16 activations), with a
  scale and a zero point per group of INT4_GROUP inputs; where int8_kernel.py builds, up to
  int4_dequantize_min_rows() - 1 rows (55, or 159 without AMX-BF16) through its kernel over that layout (as
  torch packs it on an AVX-512 CPU, whatever this CPU: pack_int4_tile)
  (int16 activations; the scales kept tile by tile for it), and more through blocks of the weight
  dequantized to bf16 from it and multiplied by oneDNN; where the CPU has AMX-INT8,
  int8_kernel.INT4_AMX_ROWS rows on its tiles, and where it has AMX-BF16 too, from int8_kernel.INT4_TILES_MIN_ROWS
  rows the weight dequantized into bf16 tiles that stay in L2 (int4_tiles_gemm), not into memory; where it has no
  AMX, int8_kernel.INT4_INT8_MIN_ROWS rows and more through int4_int8.c (activations int8 per group: half the
  multiplies, 1.2-2x int4_gemm and 1.3-2.5x the blocks there). On a CPU with AVX2 and not AVX-512, every row count
  through int4_int8.c's AVX2 build (int8_kernel.INT4_INT8_AVX2_MIN_ROWS: the same numbers as its AVX-512 build;
  2-4x torch's kernel there, which also beats fp32 blocks), or quant_avx2.c's int4_gemm where that build fails.
Why these kernels and that group size: BENCHMARKS.md ("Weight-only quantization").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from torch import nn

from . import int8_kernel

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 64  # inputs per int4 scale/zero point: 4.5 bits a weight, as llama.cpp's Q4_0
# the spreads of a group's range over the int4 levels that int4_fit tries: 15 is the range's own, 1/8 of the
# error of the 40-layer int4 model's next-token distributions (KL) goes with the others (BENCHMARKS.md)
INT4_SPREADS = (15.5, 15.0, 14.5, 14.0, 13.5, 13.0, 12.5, 12.0, 11.0)
PACK_TILE_ROWS = 64  # torch's CPU int4 layout packs output rows in tiles of 64
# from this many rows, int4 goes through bf16-dequantized blocks (where the CPU has AMX-INT8,
# int8_kernel.INT4_AMX_ROWS rows run on its tiles before either). At glm-4-9b's shapes int8_gemm.c's int4_gemm
# takes, against the blocks where oneDNN's bf16 products run on AMX-BF16 tiles, 1.3-1.5x less time at 32 rows,
# 1.0-1.2x at 48, 0.75-0.93x at 64; where they run in AVX-512 BF16 (an AMD EPYC), a layer's four products
# 1.64x less at 64 rows, 1.19x at 128, 0.99x at 160 (BENCHMARKS.md)
INT4_DEQUANTIZE_MIN_ROWS = 56
INT4_DEQUANTIZE_MIN_ROWS_NO_AMX = 160
LOAD_CHUNK_ELEMENTS = 1 << 20  # weights quantized at a time (4 MB in fp32): the load's only temporaries


def _row_chunks(start: int, stop: int, w: torch.Tensor, device):
    """(r0, r1, rows r0..r1 of the weight as a fresh fp32 tensor) for the rows [start, stop) that w
    holds, a multiple of PACK_TILE_ROWS rows at a time."""
    rows = max(PACK_TILE_ROWS, LOAD_CHUNK_ELEMENTS // w.shape[1] // PACK_TILE_ROWS * PACK_TILE_ROWS)
    for r0 in range(start, stop, rows):
        r1 = min(stop, r0 + rows)
        yield r0, r1, w[r0 - start : r1 - start].to(device, torch.float32, copy=True)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias; q int8 [out, in] in [-127, 127], one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def load_weight_rows(self, start: int, stop: int, w: torch.Tensor) -> None:
        """Quantize rows [start, stop) of the weight from w [stop - start, in] (any float dtype)."""
        for r0, r1, chunk in _row_chunks(start, stop, w, self.scale.device):
            scale = (chunk.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16)  # [rows], as it is kept
            self.qweight[r0:r1] = chunk.div_(scale.float()[:, None]).round_().clamp_(-127, 127)  # in place
            self.scale[r0:r1] = scale

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]  # [out, in] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and int8_kernel.kernels_available():
            y = int8_kernel.matmul(x.reshape(-1, self.in_features), self.qweight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


def pack_int4_tile(q: torch.Tensor) -> torch.Tensor:
    """q [64, K] in [0, 15] -> [64, K / 2] uint8 in the layout that torch's CPU int4 packing gives on an AVX-512
    CPU, whatever this CPU is (on an AVX2 CPU torch packs tiles of 32 rows otherwise; our kernels read this one):
    for each input k, 32 bytes, byte d (d < 16) holding rows d (low nibble) and d + 32 (high), byte 16 + d rows
    d + 16 and d + 48."""
    k = q.shape[1]
    lanes = q.to(torch.uint8).view(4, 16, k)  # [row // 16, row % 16, K]
    pairs = lanes[:2] | lanes[2:] << 4  # [2, 16, K]: rows r (low nibbles) and r + 32 (high)
    return pairs.permute(2, 0, 1).reshape(PACK_TILE_ROWS, k // 2)  # [K, 2, 16] -> [64, K / 2]


def unpack_int4_tiles(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4_tile's inverse over every tile: packed [N, K / 2] -> q [N, K] uint8."""
    n, k = packed.shape[0], packed.shape[1] * 2
    pairs = packed.view(n // PACK_TILE_ROWS, k, 2, 16)  # [tile, K, 2, 16]
    q = torch.stack((pairs & 15, pairs >> 4), 2)  # [tile, K, nibble, 2, 16]: row nibble * 32 + 16 * lane + d
    return q.permute(0, 2, 3, 4, 1).reshape(n, k)  # [tile, 64 rows, K] -> [N, K]


def int4_fit(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (scale, minimum) [...] fp32, of w ~ q * scale + minimum with q in 0..15, fitted to the least
    squared error: for each spread of its range in INT4_SPREADS the nearest codes, then for those the least-squares
    scale and minimum; the best of them, never worse than the range's own (int4_fit.c). Without a C compiler the
    levels are spread over the range: in torch the fit took ~30x as long, minutes over a 9B model's load."""
    shape, g = groups.shape[:-1], groups.shape[-1]
    flat = groups.reshape(-1, g).float().contiguous()
    fitted = int8_kernel.int4_fit(flat, torch.tensor(INT4_SPREADS, dtype=torch.float32))
    if fitted is not None:
        return fitted[0].view(shape), fitted[1].view(shape)
    low, high = flat.amin(-1), flat.amax(-1)
    return ((high - low).clamp(min=1e-12) / 15).view(shape), low.view(shape)


@functools.cache
def int4_dequantize_min_rows() -> int:
    """The rows from which an int4 product goes through bf16-dequantized blocks on this CPU."""
    return INT4_DEQUANTIZE_MIN_ROWS if int8_kernel.cpu_has(("amx_bf16",)) else INT4_DEQUANTIZE_MIN_ROWS_NO_AMX


class Int4Linear(nn.Module):
    """w = q * scale + min per group of `group` inputs, q in [0, 15], held in torch's packed CPU layout (where
    our kernels take it, that layout as torch packs it on an AVX-512 CPU: pack_int4_tile).

    That layout interleaves rows in tiles of PACK_TILE_ROWS: a tile is packed once all its rows have
    come (a tile split between two checkpoint tensors, like HF's q/k/v, waits in a small buffer). Where
    int8_gemm.c's or quant_avx2.c's kernels take it (`tiled`), the (scale, zero) pairs are kept tile by tile, [out / 64,
    in / group, 64, 2], the order those kernels read them in; else as torch's kernel takes them,
    [in / group, out, 2]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 group: int = INT4_GROUP):
        super().__init__()
        group = math.gcd(group, in_features)  # glm-4's inputs (4096, 13696) take it whole; small test models less
        if group < 32 or out_features % 16:
            raise ValueError(f"int4 needs in_features a multiple of 32 and out_features of 16, "
                             f"got {in_features} x {out_features}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.tiled = (torch.device(device or "cpu").type == "cpu" and out_features % PACK_TILE_ROWS == 0
                      and int8_kernel.kernels_available())
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (scale, zero) with w = (q - 8) * scale + zero, torch's convention
        shape = ((out_features // PACK_TILE_ROWS, in_features // group, PACK_TILE_ROWS, 2) if self.tiled
                 else (in_features // group, out_features, 2))
        self.register_buffer("scales_and_zeros", torch.empty(shape, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._partial: dict[int, list] = {}  # tile -> [its rows' q, how many have come], while loading

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def scales_by_row(self) -> torch.Tensor:
        """The (scale, zero) pairs as torch's kernel takes them, [in / group, out, 2]: a view, or (tiled) a copy."""
        if not self.tiled:
            return self.scales_and_zeros
        return self.scales_and_zeros.permute(1, 0, 2, 3).reshape(self.in_features // self.group, self.out_features, 2)

    def load_weight_rows(self, start: int, stop: int, w: torch.Tensor) -> None:
        k, g = self.in_features, self.group
        for r0, r1, chunk in _row_chunks(start, stop, w, self.packed.device):
            groups = chunk.view(r1 - r0, k // g, g)
            scale, low = int4_fit(groups)  # [rows, in / group]
            scale = scale.clamp(min=1e-12).to(torch.bfloat16)  # as they are kept
            zero = (low + 8 * scale.float()).to(torch.bfloat16)
            q = groups.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8).round_().clamp_(0, 15)
            self._store(r0, r1, q.view(-1, k).to(torch.int32), torch.stack((scale, zero), -1))

    def load_code_rows(self, start: int, stop: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rows [start, stop) given as int4 already: codes q [rows, in] in 0..15 and each group's scale and zero
        [rows, in / group] (a GGUF file's 4-bit blocks, gguf_blocks.int4_codes), kept as they are but for the
        bf16 of scale and zero."""
        rows = stop - start
        assert q.shape == (rows, self.in_features) and scale.shape == (rows, self.in_features // self.group)
        self._store(start, stop, q.to(torch.int32), torch.stack((scale, zero), -1).to(torch.bfloat16))

    def _store(self, r0: int, r1: int, q: torch.Tensor, pairs: torch.Tensor) -> None:
        """Codes q [rows r0..r1, in] (int32) and their (scale, zero) pairs [rows, in / group, 2] (bf16) into the
        layouts the kernels read; a pack tile of rows is packed once all its rows have come."""
        k = self.in_features
        self._store_scales(r0, r1, pairs)
        for tile in range(r0 // PACK_TILE_ROWS, -(-r1 // PACK_TILE_ROWS)):
            t0, t1 = tile * PACK_TILE_ROWS, min(self.out_features, (tile + 1) * PACK_TILE_ROWS)
            a, b = max(r0, t0), min(r1, t1)
            if (a, b) == (t0, t1):
                self._pack(t0, t1, q[a - r0 : b - r0])
                continue
            part = self._partial.setdefault(tile, [torch.zeros(t1 - t0, k, dtype=torch.int32), 0])
            part[0][a - t0 : b - t0] = q[a - r0 : b - r0]
            part[1] += b - a
            if part[1] == t1 - t0:
                self._pack(t0, t1, self._partial.pop(tile)[0])

    def _store_scales(self, r0: int, r1: int, pairs: torch.Tensor) -> None:
        """pairs [rows r0..r1, in / group, 2] into the scales' layout."""
        if not self.tiled:
            self.scales_and_zeros[:, r0:r1] = pairs.transpose(0, 1)
            return
        for tile in range(r0 // PACK_TILE_ROWS, -(-r1 // PACK_TILE_ROWS)):
            t0 = tile * PACK_TILE_ROWS
            a, b = max(r0, t0), min(r1, t0 + PACK_TILE_ROWS)
            self.scales_and_zeros[tile, :, a - t0 : b - t0] = pairs[a - r0 : b - r0].transpose(0, 1)

    def _pack(self, t0: int, t1: int, q: torch.Tensor) -> None:
        if self.tiled:
            self.packed[t0:t1] = pack_int4_tile(q)
        else:
            self.packed[t0:t1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(self.packed.device), 1)

    def dequantized(self) -> torch.Tensor:
        """[out, in] fp32. Tiled: unpacked here (unpack_int4_tiles) and scaled in float64; else read back
        through torch's kernel, whose layout it is: with x = I in fp32, each column of the product is a weight
        row, dequantized in fp32."""
        if self.tiled:
            n, k, g = self.out_features, self.in_features, self.group
            q = unpack_int4_tiles(self.packed).double().view(n, k // g, g)
            scale, zero = self.scales_by_row().double().permute(2, 1, 0)  # each [out, in / group]
            return ((q - 8) * scale[..., None] + zero[..., None]).view(n, k).float()
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.packed.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group,
                                                         self.scales_by_row().float()).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.tiled and int8_kernel.int4_tiles_fit(rows.shape[0], self.out_features, self.in_features, self.group):
            y = int8_kernel.int4_tiles_matmul(rows, self.packed, self.scales_and_zeros, self.group)
        elif self.tiled and int8_kernel.int4_amx_fits(rows.shape[0], self.out_features, self.in_features, self.group):
            y = int8_kernel.int4_amx_gemm(rows, self.packed, self.scales_and_zeros, self.group)
        elif self.tiled and int8_kernel.int4_int8_fits(rows.shape[0], self.out_features, self.in_features, self.group):
            y = int8_kernel.int4_int8_gemm(rows, self.packed, self.scales_and_zeros, self.group)
        elif self.tiled and (rows.shape[0] < int4_dequantize_min_rows() or not int8_kernel.available()):
            y = int8_kernel.int4_gemm(rows, self.packed, self.scales_and_zeros, self.group)
        elif self.tiled:
            y = int8_kernel.int4_matmul(rows, self.packed, self.scales_and_zeros, self.group)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.packed, self.group,
                                                          self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_linears(model: nn.Module, scheme: str | Mapping[str, str | None], device=None,
                     int4_group: int = INT4_GROUP) -> int:
    """Replace the nn.Linear layers of `model` (on meta, before loading) by empty quantized linears on `device`,
    for the loader to fill: every one of `scheme` ("int8" | "int4"), or each of its own by module name
    (missing or None: left as it is). Returns how many."""
    make = {"int8": Int8Linear, "int4": functools.partial(Int4Linear, group=int4_group)}
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            kind = scheme if isinstance(scheme, str) else scheme.get(f"{parent_name}.{name}".lstrip("."))
            if isinstance(child, nn.Linear) and kind is not None:
                setattr(parent, name, make[kind](child.in_features, child.out_features, child.bias is not None,
                                                 child.weight.dtype, device))
                swapped += 1
    return swapped


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
