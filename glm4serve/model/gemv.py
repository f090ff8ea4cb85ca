"""One row times a weight on a GPU, in Triton: the matrix products of a batch-1 decode step.

With one row a linear is a matrix-vector product: it reads each weight once for two flops, so its
time is the weight's bytes over the card's bandwidth. On an H200, cuBLAS's kernels for glm-4-9b's
products read at 3.1-3.8 TB/s of the 4.2 a copy gets (gate_up, the largest, at 3.6), and o and down
add a split-K reduction kernel each (BENCHMARKS.md). Here each program takes `rows` rows of the
weight whole and walks the input dim `cols` at a time, summing the products in fp32 registers: one
kernel a product (no split of the input dim to add up after), its bytes in flight set by rows x cols
and by how many programs an SM holds. Which blocks read fastest, and whether any beats cuBLAS, is the
GPU's to say: the CUDA runner times them at load (`fastest`), product by product.

The same launch can also do what comes before and after a product in a decode layer (`linear`'s
options: the norm of its input; the bias, the rotary of q and k, SwiGLU, the residual add; the store
of k and v into the KV cache), so that one_row.py's batch-1 layer needs no kernels of its own for
them. On sm_90 and newer it is launched with programmatic dependent launch: before the kernel it
follows has ended, its programs loading their first weights and then waiting on the GPU for that
kernel's writes (no launch gap between two products of a layer).

The launch is a custom op (glm4serve::row_product; row_product_kv with the K/V store), so that a
piece compiled by inductor calls it as it calls cuBLAS, and a CUDA graph captures it. On CPU,
Triton's interpreter (TRITON_INTERPRET=1) runs the kernel: that is how the tests check it.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MARGIN = 0.97  # the kernel runs a product where it takes under this share of cuBLAS's time
ERROR_LIMIT = 0.02  # its largest difference from cuBLAS's product, over that product's largest value


@dataclass(frozen=True)
class Blocks:
    """A launch's shape: weight rows per program, input dims per loop step, warps per program."""
    rows: int = 8
    cols: int = 512
    warps: int = 4

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}/{self.warps}w"


# the candidates timed for each product (at load, and by bench_gpu.py). Compiled for an H100/H200 (sm_90) in bf16, each
# fits 4 to 25 programs on an SM, 48-100 KiB of weight loads a step in flight per SM between them
# (benchmarks/gemv_compiled.py): small programs, many to an SM, to larger ones
SWEEP = (Blocks(4, 512, 2), Blocks(8, 256, 2), Blocks(4, 512, 4), Blocks(8, 512, 4), Blocks(2, 1024, 4),
         Blocks(4, 1024, 4), Blocks(16, 512, 8), Blocks(4, 2048, 8))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_product_kernel(x_ptr, w_ptr, y_ptr, N, K, b_ptr, norm_ptr, eps, res_ptr, cos_ptr, sin_ptr, rotated,
                           k_ptr, v_ptr, slot_ptr, kv_width, slot_stride,
                           HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, ROTARY: tl.constexpr,
                           RESIDUAL: tl.constexpr, STORE_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                           ROWS: tl.constexpr, COLS: tl.constexpr, PDL: tl.constexpr):
        j = tl.arange(0, ROWS)
        if SWIGLU:  # N outputs from a weight of 2N rows [gate | up]: a program's rows gate, up, gate, up, ...
            out = tl.program_id(0) * (ROWS // 2) + j // 2  # [ROWS] the output each row makes
            rows = tl.minimum(out, N - 1) + (j % 2) * N
        else:
            out = tl.program_id(0) * ROWS + j
            rows = tl.minimum(out, N - 1)  # rows past N read row N - 1 again (no mask on the loads), store nothing
        starts = w_ptr + rows.to(tl.int64)[:, None] * K  # [ROWS, 1]
        cols = tl.arange(0, COLS)[None, :]  # [1, COLS]
        # the input read as a [ROWS, COLS] tile, each thread the inputs its weights meet (from L1): in the
        # weights' layout, with no exchange between warps in the loop (a [COLS] load would be rearranged
        # through shared memory, behind two barriers a step)
        inputs = x_ptr + cols + 0 * j[:, None]  # [ROWS, COLS]
        scales = norm_ptr + cols + 0 * j[:, None]  # [ROWS, COLS]: the norm's weight, where NORM
        # the weights' first step, loaded before the wait: the weights are no kernel's output, so with
        # PDL their first bytes stream in while the kernel before this one ends
        first_w = tl.load(starts + cols, mask=cols < K, other=0.0)  # [ROWS, COLS]
        if PDL:  # launched before the kernel this one follows has ended: nothing it writes is read before here
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may take the SMs this one leaves
        # each thread's 8 neighbouring products (one 16-byte load of bf16) summed as they come: a few
        # registers a thread, not ROWS x COLS / threads, so more programs fit an SM, more bytes in flight.
        # With NORM, RMSNorm's sum of squares of the input is summed alongside, from the same loads (each
        # row of the tile has the whole input: no pass of its own over it)
        a = tl.load(inputs, mask=cols < K, other=0.0).to(tl.float32)  # [ROWS, COLS]
        if NORM:
            squares = tl.sum(tl.reshape(a * a, [ROWS, COLS // 8, 8]), 2)  # [ROWS, COLS // 8]
            a *= tl.load(scales, mask=cols < K, other=0.0).to(tl.float32)
        acc = tl.sum(tl.reshape(first_w.to(tl.float32) * a, [ROWS, COLS // 8, 8]), 2)  # [ROWS, COLS // 8]
        whole = tl.maximum(K - K % COLS, COLS)  # the steps after the first, up to the last whole one
        for k in range(COLS, whole, COLS):
            a = tl.load(inputs + k).to(tl.float32)  # [ROWS, COLS]
            if NORM:
                squares += tl.sum(tl.reshape(a * a, [ROWS, COLS // 8, 8]), 2)
                a *= tl.load(scales + k).to(tl.float32)
            p = tl.load(starts + k + cols).to(tl.float32) * a
            acc += tl.sum(tl.reshape(p, [ROWS, COLS // 8, 8]), 2)
        if whole < K:  # the input dims past the last whole step (13,696 = 26.75 x 512 for down)
            inside = whole + cols < K  # [1, COLS]
            a = tl.load(inputs + whole, mask=inside, other=0.0).to(tl.float32)
            if NORM:
                squares += tl.sum(tl.reshape(a * a, [ROWS, COLS // 8, 8]), 2)
                a *= tl.load(scales + whole, mask=inside, other=0.0).to(tl.float32)
            p = tl.load(starts + whole + cols, mask=inside, other=0.0).to(tl.float32) * a
            acc += tl.sum(tl.reshape(p, [ROWS, COLS // 8, 8]), 2)
        y = tl.sum(acc, 1)  # [ROWS]
        if NORM:  # W (norm_weight * x / rms) = (W (norm_weight * x)) / rms; 1 / rms the same in every row
            y *= tl.rsqrt(tl.sum(squares, 1) / K + eps)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)  # the product as F.linear gives it, before what follows
        if ROTARY:  # outputs [0, rotated) are q and k heads: each pair (2i, 2i + 1) turned, as glm4.rotate does
            first, second = tl.split(tl.reshape(y, [ROWS // 2, 2]))
            partner = tl.reshape(tl.join(second, first), [ROWS])  # x1, x0, x3, x2, ...
            dim = out % HEAD_DIM  # cos 1 and sin 0 past the rotary dims
            turned = y * tl.load(cos_ptr + dim) + partner * tl.load(sin_ptr + dim)
            y = tl.where(out < rotated, turned, y)
        if STORE_KV:  # the last 2 kv_width outputs are k and v (qkv's): also into the cache at the slot
            slot = tl.load(slot_ptr).to(tl.int64)
            into = out - (N - 2 * kv_width)  # [ROWS] within k, then v
            kept = y.to(y_ptr.dtype.element_ty)
            tl.store(k_ptr + slot * slot_stride + into, kept, mask=(into >= 0) & (into < kv_width))
            tl.store(v_ptr + slot * slot_stride + into - kv_width, kept, mask=(into >= kv_width) & (out < N))
        if SWIGLU:
            gate, up = tl.split(tl.reshape(y, [ROWS // 2, 2]))  # [ROWS // 2] each
            gate = (gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty).to(tl.float32)  # F.silu's, rounded
            y = gate * up
            out = tl.program_id(0) * (ROWS // 2) + tl.arange(0, ROWS // 2)
        if RESIDUAL:  # the residual stream's add, in x's dtype as `x + h`
            y += tl.load(res_ptr + out, mask=out < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=out < N)

    return row_product_kernel


@torch.library.custom_op("glm4serve::row_product", mutates_args=())
def row_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int, cols: int,
                warps: int, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, swiglu: bool = False,
                cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None, rotated: int = 0,
                residual: Optional[torch.Tensor] = None, pdl: bool = True) -> torch.Tensor:
    """x [1, in] times weight [out, in] (+ bias [out]) -> [1, out] in x's dtype: F.linear of one row,
    launched with Blocks(rows, cols, warps); with what comes before and after it in a decode layer, each
    optional, done by the same kernel (see `linear`)."""
    return _launch(x, weight, bias, rows, cols, warps, norm_weight, eps, swiglu, cos, sin, rotated, residual, pdl)


# an op of its own: inductor cannot compile an op that mutates an optional tensor where it is None (torch 2.13)
@torch.library.custom_op("glm4serve::row_product_kv", mutates_args=("k_slots", "v_slots"))
def row_product_kv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int, cols: int,
                   warps: int, norm_weight: Optional[torch.Tensor], eps: float, cos: Optional[torch.Tensor],
                   sin: Optional[torch.Tensor], rotated: int, pdl: bool, k_slots: torch.Tensor,
                   v_slots: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """row_product (no SwiGLU, no residual) whose output's last 2 x Hkv x D values are also stored into
    the caches seen as slots [blocks * block_size, Hkv, D] at `slot` (see `linear`)."""
    return _launch(x, weight, bias, rows, cols, warps, norm_weight, eps, False, cos, sin, rotated, None, pdl,
                   (k_slots, v_slots, slot))


def _launch(x, weight, bias, rows, cols, warps, norm_weight, eps, swiglu, cos, sin, rotated, residual, pdl, kv=None):
    n, k = weight.shape
    if (swiglu or cos is not None) and rows % 2:
        raise ValueError(f"SwiGLU and the rotary pair the rows of a program: {rows} rows")
    k_slots, v_slots, slot = kv if kv is not None else (None, None, None)
    kv_width = k_slots[0].numel() if kv is not None else 0
    if kv is not None and (2 * kv_width > n or not k_slots[0].is_contiguous() or v_slots.stride() != k_slots.stride()):
        raise ValueError(f"K/V stores want the product's last {2 * kv_width} of {n} outputs and caches whose"
                         " slots are contiguous rows")
    x = x.contiguous()
    weight = weight.contiguous()
    outputs = n // 2 if swiglu else n
    y = torch.empty(1, outputs, dtype=x.dtype, device=x.device)
    grid = (-(-outputs // (rows // 2 if swiglu else rows)),)
    unused = weight  # any pointer, for the options not taken
    head_dim = cos.shape[-1] if cos is not None else 2
    pdl = pdl and launches_pdl(x.device)
    _kernel()[grid](x, weight, y, outputs, k, bias if bias is not None else unused,
                    norm_weight if norm_weight is not None else unused, eps,
                    residual.contiguous() if residual is not None else unused,
                    cos.contiguous() if cos is not None else unused, sin.contiguous() if sin is not None else unused,
                    rotated, *(k_slots, v_slots, slot, kv_width, k_slots.stride(0)) if kv is not None else
                    (unused, unused, unused, 0, 0),
                    HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu,
                    ROTARY=cos is not None, RESIDUAL=residual is not None, STORE_KV=kv is not None,
                    HEAD_DIM=head_dim, ROWS=rows, COLS=cols, PDL=pdl, num_warps=warps,
                    **({"launch_pdl": True} if pdl else {}))
    return y


@functools.cache
def launches_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (sm_90 and newer): the kernel launched before the one it follows
    has ended, its programs waiting on the GPU (griddepcontrol) instead of behind a launch gap."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@row_product.register_fake
def _(x, weight, bias, rows, cols, warps, norm_weight=None, eps=0.0, swiglu=False, cos=None, sin=None, rotated=0,
      residual=None, pdl=True):
    return x.new_empty(1, weight.shape[0] // 2 if swiglu else weight.shape[0])


@row_product_kv.register_fake
def _(x, weight, bias, rows, cols, warps, norm_weight, eps, cos, sin, rotated, pdl, k_slots, v_slots, slot):
    return x.new_empty(1, weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks: Blocks,
           norm: tuple[torch.Tensor, float] | None = None, swiglu: bool = False,
           rotary: tuple[torch.Tensor, torch.Tensor, int] | None = None,
           residual: torch.Tensor | None = None,
           store_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, pdl: bool = True) -> torch.Tensor:
    """F.linear of one row x [1, in] by the kernel, and, each where given, in this order:
    - norm (norm_weight [in], eps): of x first, RMSNorm's (glm4.RMSNorm, in fp32 without its rounding to
      x's dtype between the scale and the weight);
    - rotary (cos, signed sin [1, D], rotated): the output's first `rotated` values turned in pairs as
      glm4.rotate turns q and k heads of D values (the cos and sin of glm4.Rotary for the row's position);
    - swiglu: the weight's rows [gate | up] -> silu(gate) * up [1, out / 2] (glm4.SwiGLU);
    - residual [1, out]: added last (the residual stream's `x + h`);
    - store_kv (k_slots, v_slots, slot [1]): the output's last 2 x Hkv x D values (qkv's k and v heads,
      after the rotary) also written into the caches seen as slots [blocks * block_size, Hkv, D] at
      `slot` (attention.store_kv's, nan and inf as they are).
    Each value rounded to x's dtype where the model's own ops round it: after the product and after SiLU.
    `pdl`: launched with programmatic dependent launch where the GPU has it (sm_90 and newer)."""
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    cos, sin, rotated = rotary if rotary is not None else (None, None, 0)
    if store_kv is not None:
        if swiglu or residual is not None:
            raise ValueError("the K/V store is qkv's: no SwiGLU, no residual")
        return row_product_kv(x, weight, bias, blocks.rows, blocks.cols, blocks.warps, norm_weight, eps, cos, sin,
                              rotated, pdl, *store_kv)
    return row_product(x, weight, bias, blocks.rows, blocks.cols, blocks.warps, norm_weight, eps, swiglu, cos, sin,
                       rotated, residual, pdl)


def replay_us(product, weights: Sequence[torch.Tensor], x: torch.Tensor, calls: int = 40) -> float:
    """GPU time of product(weight, x), microseconds a call: `calls` calls over `weights` in turn (a
    model's layers: no weight twice in a row from L2, as in a decode step), captured in a CUDA graph so
    that no launch gap counts, replayed once to warm and once timed."""
    with torch.inference_mode():
        for w in weights[:2]:  # compiles, picks its kernels, off the capture
            product(w, x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                product(weights[i % len(weights)], x)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
    return 1e3 * start.elapsed_time(end) / calls


def cublas(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def relative_error(blocks: Blocks, w: torch.Tensor, x: torch.Tensor) -> float:
    """The kernel's product against cuBLAS's: the largest difference over cuBLAS's largest value."""
    with torch.inference_mode():
        exact = cublas(w, x).float()
        return ((linear(x, w, None, blocks).float() - exact).abs().max() / exact.abs().max()).item()


def pick(timings: dict, errors: dict[Blocks, float], margin: float = MARGIN) -> Blocks | None:
    """The blocks to run a product with, from each candidate's time (timings: "cublas" and Blocks ->
    microseconds): the fastest whose result agreed with cuBLAS's (relative error within ERROR_LIMIT),
    where it takes under `margin` of cuBLAS's time; else None, cuBLAS."""
    best = next(iter(_agreed_fastest_first(timings, errors)), None)
    return best if best is not None and timings[best] < margin * timings["cublas"] else None


def _agreed_fastest_first(timings: dict, errors: dict[Blocks, float]) -> list[Blocks]:
    """The candidates timed whose result agreed with cuBLAS's (relative error within ERROR_LIMIT),
    fastest first."""
    agreed = [b for b in timings if isinstance(b, Blocks) and errors.get(b, math.inf) <= ERROR_LIMIT]
    return sorted(agreed, key=timings.get)


def fastest(weights: Sequence[torch.Tensor], candidates: Sequence[Blocks] = SWEEP
            ) -> tuple[Blocks | None, Blocks | None, dict]:
    """On a GPU: the blocks in which the kernel reads `weights` (a linear of each layer) fastest ->
    (those blocks where they beat cuBLAS (pick), else None; those blocks whatever cuBLAS's time, None
    where no candidate ran and agreed; each candidate's time and error by name)."""
    x = torch.randn(1, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    timings = {"cublas": replay_us(cublas, weights, x)}
    errors, failed = {}, {}
    for blocks in candidates:
        try:  # a candidate this GPU or this Triton cannot build or run is left out, not the server
            errors[blocks] = relative_error(blocks, weights[0], x)
            timings[blocks] = replay_us(lambda w, x, blocks=blocks: linear(x, w, None, blocks), weights, x)
        except Exception as e:  # noqa: BLE001
            failed[str(blocks)] = f"{type(e).__name__}: {e}"[:300]
    report = {str(k): {"us": us, **({"error": errors[k]} if k in errors else {})} for k, us in timings.items()}
    report.update({k: {"failed": why} for k, why in failed.items()})
    return pick(timings, errors), pick(timings, errors, margin=math.inf), report


def agreed_fastest_first(report: dict, candidates: Sequence[Blocks] = SWEEP) -> list[Blocks]:
    """The candidates of a `fastest` report that ran and agreed with cuBLAS's product, fastest first."""
    timed = {b: report[str(b)] for b in candidates if "us" in report.get(str(b), {})}
    return _agreed_fastest_first({b: r["us"] for b, r in timed.items()},
                                 {b: r["error"] for b, r in timed.items() if "error" in r})


def fastest_with(weights: Sequence[torch.Tensor], candidates: Sequence[Blocks], bias: torch.Tensor | None,
                 options: dict) -> tuple[Blocks | None, dict]:
    """On a GPU: of `candidates` (blocks `fastest` found to agree with cuBLAS), those in which the kernel
    with `options` (linear's: what a folded decode layer does around the product, which costs registers,
    so may rank the blocks otherwise) reads `weights` fastest -> (them, None where none ran; each
    candidate's time, or why it failed, by name)."""
    timings, report = {}, {}
    x = torch.randn(1, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    for blocks in candidates:
        try:
            timings[blocks] = replay_us(lambda w, x, blocks=blocks: linear(x, w, bias, blocks, **options), weights, x)
            report[str(blocks)] = {"us": timings[blocks]}
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is left out, not the server
            report[str(blocks)] = {"failed": f"{type(e).__name__}: {e}"[:300]}
    return min(timings, key=timings.get, default=None), report
