/* Decode attention on CPU: one query per sequence, or up to MAX_SPAN of its last tokens (a speculative draft; a
 * prompt chunk comes as sub-spans of that many, cpu_attention.py), over its paged K/V, read in place (built where
 * the CPU has AVX2, FMA and F16C; caches [blocks, block_size, Hkv, D] in bf16, fp32 or fp8 e4m3, the last widened
 * through fp16 (fp8.h)).
 *
 * PyTorch's way gathers each sequence's blocks into a new tensor every layer and step, then runs SDPA
 * over the copy: at a 16K context, 4.2 of a layer's 5.5 ms were that gather (BENCHMARKS.md). Here each
 * unit of work (a sequence, a KV head, 16 of its query heads, a split of its context) walks the block
 * table and keeps an online softmax for each of the sequence's queries, which share each step's keys and values
 * and see up to their own tokens; the splits are merged at the end (flash-decoding). The lanes of
 * every vector are the query heads: the 16 heads that share a KV head (glm-4-9b: 32 over 2) multiply
 * one key element at a time, broadcast, so a score needs no sum across lanes, and a value element
 * likewise adds into 16 heads' outputs. K and V are widened to fp32 a few tokens at a time; every sum
 * is fp32; exp is a polynomial (relative error under 2e-7).
 *
 * decode_attention_kernel.h holds the kernel, included here once for each build: AVX-512, and AVX-512 BF16,
 * where bf16 caches are read as they are and multiplied by `vdpbf16ps` in pairs (attend_dot): 1.3-1.7x the
 * widened way; there groups of 8 query heads (glm-4-9b-chat-1m: 32 over 4) take two KV heads a vector, which one
 * would fill half of. Where the CPU has AMX-BF16 (Sapphire Rapids and later Xeons), a fourth build takes bf16 caches
 * on AMX tiles, 16 tokens a step (decode_attention_amx.h): 2.2-2.5x the AVX-512 BF16 build there, whose vdpbf16ps
 * bound it; that build also has a kernel for prompt chunks and drafts, whose tiles are rows of many queries
 * (chunk_attention_amx.h). AVX2 (most desktop and laptop CPUs) holds a vector's 16 lanes as two 8-lane halves, each
 * broadcast key or value element multiplying both (decode_attention_halves.h). A sequence's blocks lie anywhere in the cache,
 * where the hardware's prefetchers do not follow, so each step prefetches the rows of the tokens PREFETCH_TOKENS
 * ahead into L2.
 */
#include <float.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_scalar.h"
#include "fp8.h"

#define MAX_D 256  /* head sizes up to this (GLM-4: 128), a multiple of DT */
#define MAX_SPLITS 64
#define MAX_SPAN 64  /* queries of one sequence in a batch */

#define LANES 16  /* query heads a unit takes */
#define PREFETCH_TOKENS 32  /* how far ahead each step prefetches (16-64 measured alike, 128 a little slower) */
/* KV heads attend_dot packs into a vector: 2 for groups of 8 over an even number of KV heads, where its bf16 pairs
 * run (cpu_attention.py's packs() says the same) */
#define PACKS(paired, G, Hkv) (BF16_DOT && !AMX && (paired) && 2 * (G) == LANES && (Hkv) % 2 == 0 ? 2 : 1)
enum { KV_FP32, KV_BF16, KV_FP8 };  /* a cache's element type */
#define KV_ESIZE(kind) ((kind) == KV_FP8 ? 1 : (kind) == KV_BF16 ? 2 : 4)
#define NT 8      /* tokens a step: their scores are NT independent sums (even, for attend_dot's pairs) */
#define DT 8      /* value dims a step of the weighted sum */
#define BF16_DOT 1
#define HALVES 0
/* GCC before 11 knows AVX-512 BF16 but not the AMX targets: there the library has no AMX build (as with -DNO_AMX) */
#if !defined(NO_AMX) && (defined(__clang__) || __GNUC__ >= 11)
#include "amx_tiles.h"
#define AMX 1
#define ISA "avx512f,avx512bw,avx512bf16,f16c,amx-tile,amx-bf16"
#define F(name) name##_amx
#include "decode_attention_kernel.h"
#include "chunk_attention_amx.h"
#undef AMX
#undef ISA
#undef F
#endif
#define AMX 0
#define ISA "avx512f,avx512bw,avx512bf16,f16c"
#define F(name) name##_avx512bf16
#include "decode_attention_kernel.h"
#undef BF16_DOT
#undef HALVES
#undef ISA
#undef F

#define BF16_DOT 0
#define HALVES 0
#define ISA "avx512f,f16c"
#define F(name) name##_avx512
#include "decode_attention_kernel.h"
#undef HALVES
#undef ISA
#undef F
#undef NT
#undef DT

#define HALVES 1
#define NT 8  /* 1.04-1.09x 4 (the value sums' outputs read and written half as often), as quick as 16 */
#define QT 4  /* tokens whose scores are summed at a time: 2 * QT of the 16 registers */
#define DT 4
#define ISA "avx2,fma,f16c"
#define F(name) name##_avx2
#include "decode_attention_kernel.h"
