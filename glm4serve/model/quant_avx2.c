/* The weight-only quantized products of int8_gemm.c in AVX2, for quant.py's linears on CPUs without AVX-512 (most
 * desktop and laptop CPUs): its int8_int16_gemm and int4_gemm, with the same operands and the same numbers, bit for
 * bit (the int32 sums are exact, and they are turned to floats, added and scaled in the same order), 8 lanes wide.
 * Built by int8_kernel.py with `-mavx2 -mfma`. torch's own kernels there take a glm-4-9b decode step 1.2x (int8,
 * both near the memory's rate) and 3.4x (int4) as long at one stream, 1.7-2.5x at 8-16 (BENCHMARKS.md).
 *
 * int4: `packed` in torch's CPU layout, [N / 64][K][32] bytes, byte j of (tile t, input k) holding
 * row 64t + j in its low nibble and row 64t + 32 + j in its high one; `sz` the (scale, zero) bf16 pairs
 * tile by tile, [N / 64][K / group][64], w = (q - 8) * scale + zero.
 *
 * vpmaddwd multiplies 16 int16 pairs and adds each pair into one of 8 int32 lanes, so lane i wants
 * (q[row, k], q[row, k + 1]) against (x[k], x[k + 1]). Taken as 32-bit lanes, the bytes 4i..4i+3 of input
 * k hold rows 4i..4i+3 and 32+4i..35+4i; putting the low 16 bits of input k's lane beside those of input
 * k + 1 (one blend) leaves each of 4 rows' two nibbles at the same place in both halves, taken out by a
 * shift and a mask. So two inputs of a tile's 64 rows unpack to 8 vectors, each 8 rows 4 apart (`unpack`),
 * and the sums are put back in row order once per group (`in_row_order`).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int16_rows.h"

/* as int8_gemm.c's int4_gemm: the stream asked for into L1 and, further ahead, into L2 */
#define INT4_PREFETCH_L1 2048
#define INT4_PREFETCH_L2 8192
#define MAX_GROUP 64  /* quant.py's INT4_GROUP: a group's unpacked weights fit one 8 KiB buffer */
#define BUFFER_MIN_ROWS 4  /* fewer activation rows unpack the weights as they go, two rows a pass */

/* Inputs k and k + 1 of a tile's 64 rows (64 bytes from p), their 16-bit halves side by side: half 0 (t) bytes 4i,
   4i+1 of k | of k + 1, half 1 (u) bytes 4i+2, 4i+3. */
static inline __attribute__((always_inline)) __m256i interleave(const uint8_t *p, int half) {
    __m256i b0 = _mm256_loadu_si256((const __m256i *)p), b1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    return half ? _mm256_blend_epi16(_mm256_srli_epi32(b0, 16), b1, 0xAA)
                : _mm256_blend_epi16(b0, _mm256_slli_epi32(b1, 16), 0xAA);
}

/* Class c (0-3) of an interleaved half: lane i = the (k, k + 1) int16 pairs of row 4i + {0, 1, 32, 33}[c] (half 0)
   or 4i + {2, 3, 34, 35}[c] (half 1). Class 2 is left 16x (its nibbles where they lie: a mask, no shift), a group's
   sums of it divided back exactly in in_row_order; 16 * 15 * 32767 * 64 < 2^31. */
static inline __attribute__((always_inline)) __m256i nibble_class(__m256i t, int c) {
    const __m256i low = _mm256_set1_epi32(0x000F000F), second = _mm256_set1_epi32(0x00F000F0);
    switch (c) {
        case 0: return _mm256_and_si256(t, low);
        case 1: return _mm256_and_si256(_mm256_srli_epi16(t, 8), low);
        case 2: return _mm256_and_si256(t, second);
        default: return _mm256_srli_epi16(t, 12);  /* the top nibble of each 16 bits: nothing above it to mask */
    }
}

/* Inputs k and k + 1 of a tile's 64 rows -> w[4 * half + c] = nibble_class(interleave(p, half), c). */
static inline void unpack(const uint8_t *p, __m256i w[8]) {
    for (int half = 0; half < 2; half++)
        for (int c = 0; c < 4; c++) w[4 * half + c] = nibble_class(interleave(p, half), c);
}

/* Four vectors of rows 4i + 0..3 (a, b, c, d: lane i each) -> rows 0-7, 8-15, 16-23, 24-31 (out[0..3]). */
static inline void transpose4(__m256i a, __m256i b, __m256i c, __m256i d, __m256i out[4]) {
    __m256i ab_lo = _mm256_unpacklo_epi32(a, b), ab_hi = _mm256_unpackhi_epi32(a, b);  /* lanes 0,1,4,5 | 2,3,6,7 */
    __m256i cd_lo = _mm256_unpacklo_epi32(c, d), cd_hi = _mm256_unpackhi_epi32(c, d);
    /* rows 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31 */
    __m256i r0 = _mm256_unpacklo_epi64(ab_lo, cd_lo), r1 = _mm256_unpackhi_epi64(ab_lo, cd_lo);
    __m256i r2 = _mm256_unpacklo_epi64(ab_hi, cd_hi), r3 = _mm256_unpackhi_epi64(ab_hi, cd_hi);
    out[0] = _mm256_permute2x128_si256(r0, r1, 0x20);
    out[1] = _mm256_permute2x128_si256(r2, r3, 0x20);
    out[2] = _mm256_permute2x128_si256(r0, r1, 0x31);
    out[3] = _mm256_permute2x128_si256(r2, r3, 0x31);
}

/* acc (unpack's order, classes 2 and 6 16x) -> sums of rows 0-7, 8-15, ..., 56-63. */
static inline void in_row_order(const __m256i acc[8], __m256i sums[8]) {
    transpose4(acc[0], acc[1], acc[4], acc[5], sums);
    transpose4(_mm256_srai_epi32(acc[2], 4), acc[3], _mm256_srai_epi32(acc[6], 4), acc[7], sums + 4);
}

/* One group's sums scaled into out[0..63] (fp32, running over the groups), as int4_gemm does: out = scale * sum +
   ((zero - 8 * scale) * gsum + out). */
static inline void scale_group(const __m256i acc[8], const uint32_t *pairs, float gsum, float *out, int first) {
    __m256i sums[8];
    in_row_order(acc, sums);
    for (int v = 0; v < 8; v++) {
        __m256i p = _mm256_loadu_si256((const __m256i *)(pairs + v * 8));
        __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
        __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(p, _mm256_set1_epi32((int)0xFFFF0000)));
        __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
        __m256 o = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + v * 8);
        o = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums[v]), _mm256_fmadd_ps(offset, _mm256_set1_ps(gsum), o));
        _mm256_storeu_ps(out + v * 8, o);
    }
}

static inline __m256i pair_of(const int16_t *x) {  /* inputs k and k + 1 in every lane */
    return _mm256_set1_epi32((int32_t)(uint16_t)x[0] | ((int32_t)x[1] << 16));
}

static inline void madd8(__m256i acc[8], const __m256i w[8], __m256i pair) {
    for (int c = 0; c < 8; c++) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(w[c], pair));
}

/* One activation row's sums over one group (from p, its inputs x), in unpack's order: each class multiplied in as
   soon as it is made, in a function of its own. Made in one loop with the rest of int4_gemm (unpack, then madd8),
   GCC kept some sums and masks on the stack, and one row ran at ~10 GB/s a core whether the weights were in cache
   or not. */
static __attribute__((noinline)) void group_sums(const uint8_t *p, const int16_t *x, int64_t group, __m256i out[8]) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t k = 0; k < group; k += 2, p += 64) {  /* named sums: as an array GCC kept them on the stack */
        _mm_prefetch((const char *)(p + INT4_PREFETCH_L1), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + INT4_PREFETCH_L2), _MM_HINT_T1);
        __m256i pair = pair_of(x + k), t = interleave(p, 0), u = interleave(p, 1);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(nibble_class(t, 0), pair));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(nibble_class(t, 1), pair));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(nibble_class(t, 2), pair));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(nibble_class(t, 3), pair));
        a4 = _mm256_add_epi32(a4, _mm256_madd_epi16(nibble_class(u, 0), pair));
        a5 = _mm256_add_epi32(a5, _mm256_madd_epi16(nibble_class(u, 1), pair));
        a6 = _mm256_add_epi32(a6, _mm256_madd_epi16(nibble_class(u, 2), pair));
        a7 = _mm256_add_epi32(a7, _mm256_madd_epi16(nibble_class(u, 3), pair));
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3, out[4] = a4, out[5] = a5, out[6] = a6, out[7] = a7;
}

/* Two activation rows' sums over one group, as group_sums makes each: the classes of half 0, then those of half 1,
   so that each pass holds 8 sums (both rows' 16 at once would take every register AVX2 has); the second pass
   reads the group's 2 KiB from L1. */
static __attribute__((noinline)) void group_sums2(const uint8_t *p, const int16_t *x0, const int16_t *x1,
                                                  int64_t group, __m256i out0[8], __m256i out1[8]) {
    for (int half = 0; half < 2; half++) {
        __m256i a[4], b[4];
        for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_si256();
        const uint8_t *q = p;
        for (int64_t k = 0; k < group; k += 2, q += 64) {
            if (!half) {
                _mm_prefetch((const char *)(q + INT4_PREFETCH_L1), _MM_HINT_T0);
                _mm_prefetch((const char *)(q + INT4_PREFETCH_L2), _MM_HINT_T1);
            }
            __m256i t = interleave(q, half), x = pair_of(x0 + k), y = pair_of(x1 + k);
            for (int c = 0; c < 4; c++) {
                __m256i w = nibble_class(t, c);
                a[c] = _mm256_add_epi32(a[c], _mm256_madd_epi16(w, x));
                b[c] = _mm256_add_epi32(b[c], _mm256_madd_epi16(w, y));
            }
        }
        for (int c = 0; c < 4; c++) out0[4 * half + c] = a[c], out1[4 * half + c] = b[c];
    }
}

/* y [M, N] = xs * xq [M, K] @ W.T, as int8_gemm.c's int4_gemm (its comment has the arithmetic). Each program
   takes a tile of 64 rows; up to 3 activation rows unpack the weights as they go, more unpack each group once into
   an L1 buffer that every row then reads. Those rows' inputs are first laid out group by group, and each tile's
   sums kept in a buffer of its own, both contiguous: read in place, rows of K or N elements (powers of two at
   glm-4-9b's 4096) fall into the same few cache sets, and from ~192 rows the products ran 2x slower.
   K and the group are even, group <= MAX_GROUP. */
void int4_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N, int64_t K, int64_t group, const int16_t *xq,
               const float *xs, int64_t M, float *y, int threads) {
    int64_t groups = K / group;
    float *gsum = malloc(sizeof(float) * M * groups);  /* sum of each row's inputs in each group */
    int16_t *xg = M >= BUFFER_MIN_ROWS ? malloc(sizeof(int16_t) * M * K) : NULL;  /* [groups][M][group] */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += xq[m * K + k];
            gsum[m * groups + g] = (float)s;
            if (xg) memcpy(xg + (g * M + m) * group, xq + m * K + g * group, sizeof(int16_t) * group);
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t tile = 0; tile < N / 64; tile++) {
        const uint8_t *p = packed + tile * K * 32;
        const uint32_t *pairs = sz + tile * groups * 64;
        if (M < BUFFER_MIN_ROWS) {
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *at = p + g * group * 32;
                for (int64_t m = 0; m < M; m += 2) {
                    __m256i acc[2][8];
                    if (m + 1 < M)
                        group_sums2(at, xq + m * K + g * group, xq + (m + 1) * K + g * group, group, acc[0], acc[1]);
                    else
                        group_sums(at, xq + m * K + g * group, group, acc[0]);
                    for (int64_t r = m; r < M && r < m + 2; r++)
                        scale_group(acc[r - m], pairs + g * 64, gsum[r * groups + g], y + r * N + tile * 64, g == 0);
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int v = 0; v < 8; v++)
                    _mm256_storeu_ps(y + m * N + tile * 64 + v * 8,
                                     _mm256_mul_ps(_mm256_loadu_ps(y + m * N + tile * 64 + v * 8), _mm256_set1_ps(xs[m])));
            continue;
        }
        __m256i buffer[MAX_GROUP / 2][8];
        float *out = malloc(sizeof(float) * M * 64);  /* the tile's sums, [M][64] */
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t k = 0; k < group; k += 2) {
                int64_t at = (g * group + k) * 32;
                _mm_prefetch((const char *)(p + at + INT4_PREFETCH_L1), _MM_HINT_T0);
                _mm_prefetch((const char *)(p + at + INT4_PREFETCH_L2), _MM_HINT_T1);
                unpack(p + at, buffer[k / 2]);
            }
            const int16_t *x = xg + g * M * group;
            for (int64_t m = 0; m < M; m++) {
                __m256i acc[8];
                for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_si256();
                for (int64_t k = 0; k < group; k += 2) madd8(acc, buffer[k / 2], pair_of(x + m * group + k));
                scale_group(acc, pairs + g * 64, gsum[m * groups + g], out + m * 64, g == 0);
            }
        }
        for (int64_t m = 0; m < M; m++)
            for (int v = 0; v < 8; v++)
                _mm256_storeu_ps(y + m * N + tile * 64 + v * 8,
                                 _mm256_mul_ps(_mm256_loadu_ps(out + m * 64 + v * 8), _mm256_set1_ps(xs[m])));
        free(out);
    }
    free(xg);
    free(gsum);
}

/* ---- int8 weights (quant.py's Int8Linear) ------------------------------------------------------------------------
 * y[m, n] = scale[n] * xs[m] * sum_k w[n, k] * xq[m, k], as int8_gemm.c's int8_int16_gemm (its comment has the
 * operands). Its 16 int32 lanes per weight row are two vectors here: lane j of the low one sums inputs 2j, 2j + 1 of
 * each 32, of the high one 16 + 2j, 17 + 2j; moved to fp32 every FLUSH inputs as there, and summed across in
 * _mm512_reduce_add_ps's order (reduce16). Each program takes R weight rows: for DIRECT_MAX_ROWS activation rows
 * and more it widens them to int16 a FLUSH block at a time into an L1 buffer that every activation row reads, as
 * int8_gemm.c does; for fewer it widens them as they are read, for two activation rows at a time (pair_sums). */
#define R 4
#define FLUSH 256
#define PREFETCH 512  /* bytes ahead in each weight row, as int8_gemm.c */
#define DIRECT_MAX_ROWS 4  /* fewer activation rows widen the weights as they use them; more, once into a buffer */
#define PASS_BYTES (2 << 20)  /* activation rows a pass over the weights takes (int8_int16_gemm) */

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* lanes 0-7 (lo) and 8-15 (hi) of 16 floats, summed as GCC's _mm512_reduce_add_ps sums them */
static inline float reduce16(__m256 lo, __m256 hi) {
    __m256 half = _mm256_add_ps(hi, lo);
    __m128 quarter = _mm_add_ps(_mm256_extractf128_ps(half, 1), _mm256_castps256_ps128(half));
    __m128 pairs = _mm_add_ps(quarter, _mm_shuffle_ps(quarter, quarter, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(pairs) + _mm_cvtss_f32(_mm_shuffle_ps(pairs, pairs, 1));
}

/* acc[r] += the products of 32 inputs: the weights widened from w[r] (row stride K), the inputs a0 and a1 (16 each) */
static inline __attribute__((always_inline)) void madd32(__m256i acc[R][2], const int8_t *w, int64_t K, __m256i a0,
                                                         __m256i a1) {
    for (int r = 0; r < R; r++) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * K)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * K + 16)));
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, a0));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, a1));
    }
}

/* The R rows' fp32 lanes, sums[r][lo, hi], after the FLUSH block from k0 (the first: k0 == 0) of one activation
   row x, the weights `wide` (R rows, int16, row stride FLUSH, zeros past the inputs) or, for one activation row,
   straight from w (row stride K) but for the block's last inputs short of 32, which come from `wide`. */
static inline void block_sums(const int8_t *w, int64_t K, const int16_t (*wide)[FLUSH], const int16_t *x, int64_t k0,
                              int64_t len, __m256 sums[R][2]) {
    __m256i acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    int64_t k = 0;
    if (w != NULL)
        for (; k + 32 <= len; k += 32) {
            if ((k & 32) == 0)
                for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + r * K + k0 + k + PREFETCH), _MM_HINT_T0);
            madd32(acc, w + k0 + k, K, _mm256_loadu_si256((const __m256i *)(x + k)),
                   _mm256_loadu_si256((const __m256i *)(x + k + 16)));
        }
    for (; k < len; k += 32) {
        int16_t tail[32] __attribute__((aligned(32)));
        const int16_t *xk = x + k;
        if (k + 32 > len) {  /* the last inputs of a row: the rest zeros */
            memset(tail, 0, sizeof(tail));
            memcpy(tail, xk, sizeof(int16_t) * (len - k));
            xk = tail;
        }
        __m256i a0 = _mm256_loadu_si256((const __m256i *)xk), a1 = _mm256_loadu_si256((const __m256i *)(xk + 16));
        for (int r = 0; r < R; r++) {
            __m256i w0 = _mm256_load_si256((const __m256i *)(wide[r] + k));
            __m256i w1 = _mm256_load_si256((const __m256i *)(wide[r] + k + 16));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, a0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, a1));
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            __m256 part = _mm256_cvtepi32_ps(acc[r][h]);
            sums[r][h] = k0 == 0 ? part : _mm256_add_ps(sums[r][h], part);
        }
}

/* As block_sums for two activation rows x0 and x1 against two weight rows straight from w (row stride K; their
   block's last inputs short of 32 from wide[0..1]): each weight vector widened once for both, into s0 and s1. */
static inline void pair_sums(const int8_t *w, int64_t K, const int16_t (*wide)[FLUSH], const int16_t *x0,
                             const int16_t *x1, int64_t k0, int64_t len, __m256 s0[][2], __m256 s1[][2]) {
    __m256i acc[2][2][2];  /* [weight row][lo, hi][activation row] */
    for (int r = 0; r < 2; r++)
        for (int h = 0; h < 2; h++) acc[r][h][0] = acc[r][h][1] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
        if ((k & 32) == 0)
            for (int r = 0; r < 2; r++) _mm_prefetch((const char *)(w + r * K + k0 + k + PREFETCH), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m256i a0 = _mm256_loadu_si256((const __m256i *)(x0 + k + 16 * h));
            __m256i a1 = _mm256_loadu_si256((const __m256i *)(x1 + k + 16 * h));
            for (int r = 0; r < 2; r++) {
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * K + k0 + k + 16 * h)));
                acc[r][h][0] = _mm256_add_epi32(acc[r][h][0], _mm256_madd_epi16(wv, a0));
                acc[r][h][1] = _mm256_add_epi32(acc[r][h][1], _mm256_madd_epi16(wv, a1));
            }
        }
    }
    if (k < len) {  /* the last inputs of the rows: the rest zeros */
        int16_t t0[32] __attribute__((aligned(32))) = {0}, t1[32] __attribute__((aligned(32))) = {0};
        memcpy(t0, x0 + k, sizeof(int16_t) * (len - k));
        memcpy(t1, x1 + k, sizeof(int16_t) * (len - k));
        for (int h = 0; h < 2; h++) {
            __m256i a0 = _mm256_load_si256((const __m256i *)(t0 + 16 * h));
            __m256i a1 = _mm256_load_si256((const __m256i *)(t1 + 16 * h));
            for (int r = 0; r < 2; r++) {
                __m256i wv = _mm256_load_si256((const __m256i *)(wide[r] + k + 16 * h));
                acc[r][h][0] = _mm256_add_epi32(acc[r][h][0], _mm256_madd_epi16(wv, a0));
                acc[r][h][1] = _mm256_add_epi32(acc[r][h][1], _mm256_madd_epi16(wv, a1));
            }
        }
    }
    for (int r = 0; r < 2; r++)
        for (int h = 0; h < 2; h++) {
            __m256 p0 = _mm256_cvtepi32_ps(acc[r][h][0]), p1 = _mm256_cvtepi32_ps(acc[r][h][1]);
            s0[r][h] = k0 == 0 ? p0 : _mm256_add_ps(s0[r][h], p0);
            s1[r][h] = k0 == 0 ? p1 : _mm256_add_ps(s1[r][h], p1);
        }
}

/* rows [n0, n0 + R) of w, inputs [k0 + from, k0 + len) widened into wide[r][from..], zeros past the rows' end, the
   inputs' end (up to a multiple of 32) and N */
static void widen(const int8_t *w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t from, int64_t len,
                  int16_t (*wide)[FLUSH]) {
    int64_t padded = (len + 31) & ~31;
    for (int r = 0; r < R; r++) {
        const int8_t *src = w + (n0 + r) * K + k0;
        int64_t k = from;
        if (n0 + r < N)
            for (; k + 16 <= len; k += 16) {
                if ((k & 63) == 0) _mm_prefetch((const char *)(src + k + PREFETCH), _MM_HINT_T0);
                __m128i bytes = _mm_loadu_si128((const __m128i *)(src + k));
                _mm256_store_si256((__m256i *)(wide[r] + k), _mm256_cvtepi8_epi16(bytes));
            }
        for (; k < padded; k++) wide[r][k] = n0 + r < N && k < len ? src[k] : 0;
    }
}

static void int8_int16_rows(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const int16_t *xq,
                            const float *xs, int64_t M, float *y, int threads) {
    int64_t tiles = (N + R - 1) / R;
#pragma omp parallel num_threads(threads)
    {
        __m256 (*total)[R][2] = aligned_alloc(32, sizeof(__m256) * M * R * 2);  /* [M][R][lo, hi]: fp32 sums */
        int16_t wide[R][FLUSH] __attribute__((aligned(32)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * R;
            int rows = N - n0 < R ? (int)(N - n0) : R;
            for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
                int64_t len = K - k0 < FLUSH ? K - k0 : FLUSH;
                if (N - n0 >= 2 * R)  /* the next tile's rows of these inputs into L2, as int8_gemm.c does */
                    for (int r = 0; r < R; r++)
                        for (int64_t k = 0; k < len; k += 64)
                            _mm_prefetch((const char *)(w + (n0 + R + r) * K + k0 + k), _MM_HINT_T1);
                if (M < DIRECT_MAX_ROWS && rows == R) {  /* weights widened as they come, but for a short end */
                    widen(w, N, K, n0, k0, len & ~31, len, wide);
                    int64_t m = 0;
                    for (; m + 2 <= M; m += 2)
                        for (int r = 0; r < R; r += 2)
                            pair_sums(w + (n0 + r) * K, K, wide + r, xq + m * K + k0, xq + (m + 1) * K + k0, k0, len,
                                      total[m] + r, total[m + 1] + r);
                    if (m < M) block_sums(w + n0 * K, K, wide, xq + m * K + k0, k0, len, total[m]);
                    continue;
                }
                widen(w, N, K, n0, k0, 0, len, wide);
                for (int64_t m = 0; m < M; m++) block_sums(NULL, K, wide, xq + m * K + k0, k0, len, total[m]);
            }
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < rows; r++)
                    y[m * N + n0 + r] = reduce16(total[m][r][0], total[m][r][1]) * bf16_to_float(scale[n0 + r]) * xs[m];
        }
        free(total);
    }
}

/* int8_int16_rows over the activation rows PASS_BYTES of them at a time (with their sums, 256 bytes a row): each
   tile runs against a pass's rows, which stay in cache, where a prefill's rows of K int16 inputs, read again for
   every tile, came from memory. A row's result does not depend on its pass. */
void int8_int16_gemm(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const int16_t *xq,
                     const float *xs, int64_t M, float *y, int threads) {
    int64_t pass = PASS_BYTES / (2 * K + 256);
    if (pass < DIRECT_MAX_ROWS) pass = DIRECT_MAX_ROWS;
    for (int64_t m1 = 0; m1 < M; m1 += pass)
        int8_int16_rows(w, scale, N, K, xq + m1 * K, xs + m1, M - m1 < pass ? M - m1 : pass, y + m1 * N, threads);
}
