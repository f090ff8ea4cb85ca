/* int8 weights times int16 activations on AVX-512 VNNI, for quant.py's Int8Linear (built by
 * int8_kernel.py with the system C compiler, threads from the OpenMP runtime torch has loaded).
 *
 * y[m, n] = scale[n] * xs[m] * sum_k w[n, k] * xq[m, k]
 *   w  int8 [N, K], one bf16 scale per output row (the weights as quant.py stores them);
 *   xq int16 [M, K], one scale per row: x / xs rounded, xs = max|x| / 32767, so the activations
 *      keep ~15 bits (bf16 keeps 8): the int8 weights are the only rounding that matters.
 *
 * vpdpwssd multiplies 32 pairs of int16 and adds them into 16 int32 lanes; the weights are widened
 * from int8 on the way. Each program reads R rows of weights against the same activations. The
 * int32 sums are moved to fp32 every FLUSH inputs, before they can overflow: 127 * 32767 * 2 per
 * product pair, FLUSH / 32 pairs per lane, 2^31 / (127 * 32767 * 2 * 8) > 1.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "int16_rows.h"

#define R 4
#define FLUSH 256
/* Each row's next cache lines are asked for this many bytes ahead, once per line: one row reads
   the weights from memory at ~28.7 GB/s instead of ~27 with the hardware prefetchers alone on the
   project's Intel box (measured 256 / 512 / 768 / 1024 / 2048 / 4096 bytes ahead). With one activation row,
   the next tile's rows are asked for into L2 as well, line by line beside this tile's: 1.1-1.3x from memory
   on an AMD EPYC (BENCHMARKS.md). */
#define PREFETCH 512

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* rows x 32 products of the inputs [k, k + 32) masked to `mask`, into acc. */
#define DOT32(rows, mask, k)                                                                  \
    do {                                                                                      \
        __m512i a_ = _mm512_maskz_loadu_epi16((mask), x + (k));                               \
        for (int r = 0; r < (rows); r++) {                                                    \
            __m256i wb_ = _mm256_maskz_loadu_epi8((mask), w + r * K + (k));                   \
            acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepi8_epi16(wb_), a_);              \
            if (((k) & 32) == 0) {                                                            \
                _mm_prefetch((const char *)(w + r * K + (k) + PREFETCH), _MM_HINT_T0);        \
                if (next) _mm_prefetch((const char *)(next + r * K + (k)), _MM_HINT_T1);      \
            }                                                                                 \
        }                                                                                     \
    } while (0)

/* sum over k of w[r, k] * x[k] for `rows` weight rows (row stride K) against one activation row; next (or
   NULL): R rows to prefetch into L2. Inlined with rows = R (a constant: the sums stay in registers) and once
   for the last tile. */
static inline __attribute__((always_inline)) void dot_rows(const int8_t *w, int64_t K, const int16_t *x,
                                                           int rows, float *out, const int8_t *next) {
    __m512 total[R];
    for (int r = 0; r < R; r++) total[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
        __m512i acc[R];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        int64_t k1 = k0 + FLUSH < K ? k0 + FLUSH : K;
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) DOT32(rows, (__mmask32)0xFFFFFFFFu, k);
        if (k < k1) DOT32(rows, (__mmask32)((1u << (k1 - k)) - 1u), k);
        for (int r = 0; r < rows; r++) total[r] = _mm512_add_ps(total[r], _mm512_cvtepi32_ps(acc[r]));
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(total[r]);
}

/* For BUFFER_MIN_ROWS activation rows and more, each tile's R weight rows are widened to int16 once per FLUSH
   block into an L1 buffer that every activation row then reads (one vpdpwssd per 32 inputs and row, the weights
   from L1), rather than widened again for each activation row as dot_rows does; the same sums, in the same
   order. */
#define BUFFER_MIN_ROWS 2

/* rows [n0, n0 + R) of w, inputs [k0, k0 + len), as int16 into wide[r] up to a multiple of 32 (zeros past the
   inputs and past N) */
static inline void widen(const int8_t *w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t len,
                         int16_t (*wide)[FLUSH]) {
    int next = N - n0 >= 2 * R;  /* the next tile's rows of the same inputs into L2, as dot_rows does */
    for (int r = 0; r < R; r++)
        for (int64_t k = 0; k < len; k += 32) {
            __mmask32 mask = n0 + r >= N ? 0 : len - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (len - k)) - 1u);
            const int8_t *src = w + (n0 + r) * K + k0 + k;
            if ((k & 32) == 0 && mask) _mm_prefetch((const char *)(src + PREFETCH), _MM_HINT_T0);
            if ((k & 32) == 0 && next) _mm_prefetch((const char *)(src + R * K), _MM_HINT_T1);
            _mm512_store_si512(wide[r] + k, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, src)));
        }
}

/* total[r] (fp32 lanes, k0 == 0: the first block) += the FLUSH block's sums of the R widened rows against x */
static inline void dot_wide(const int16_t (*wide)[FLUSH], const int16_t *x, int64_t k0, int64_t len, __m512 total[R]) {
    __m512i acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < len; k += 32) {
        __mmask32 mask = len - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (len - k)) - 1u);
        __m512i a = _mm512_maskz_loadu_epi16(mask, x + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_load_si512(wide[r] + k), a);
    }
    for (int r = 0; r < R; r++)
        total[r] = k0 == 0 ? _mm512_cvtepi32_ps(acc[r]) : _mm512_add_ps(total[r], _mm512_cvtepi32_ps(acc[r]));
}

void int8_int16_gemm(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const int16_t *xq,
                     const float *xs, int64_t M, float *y, int threads) {
    int64_t tiles = (N + R - 1) / R;
    if (M < BUFFER_MIN_ROWS) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * R;
            int rows = N - n0 < R ? (int)(N - n0) : R;
            float sums[R];
            const int8_t *next = N - n0 >= 2 * R ? w + (n0 + R) * K : 0;
            for (int64_t m = 0; m < M; m++) {  /* the tile's rows stay in L1 across the activation rows */
                if (rows == R)
                    dot_rows(w + n0 * K, K, xq + m * K, R, sums, next);
                else
                    dot_rows(w + n0 * K, K, xq + m * K, rows, sums, 0);
                for (int r = 0; r < rows; r++) y[m * N + n0 + r] = sums[r] * bf16_to_float(scale[n0 + r]) * xs[m];
            }
        }
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        __m512 (*total)[R] = aligned_alloc(64, sizeof(__m512) * M * R);  /* [M][R]: fp32 lanes */
        int16_t wide[R][FLUSH] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * R;
            int rows = N - n0 < R ? (int)(N - n0) : R;
            for (int64_t k0 = 0; k0 < K; k0 += FLUSH) {
                int64_t len = K - k0 < FLUSH ? K - k0 : FLUSH;
                widen(w, N, K, n0, k0, len, wide);
                for (int64_t m = 0; m < M; m++) dot_wide(wide, xq + m * K + k0, k0, len, total[m]);
            }
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < rows; r++)
                    y[m * N + n0 + r] = _mm512_reduce_add_ps(total[m][r]) * bf16_to_float(scale[n0 + r]) * xs[m];
        }
        free(total);
    }
}

/* 16 floats -> 16 bf16, rounded to nearest even (no NaNs come here: finite weights and scales). */
static inline __m256i to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

/* out bf16 [N, K] = w[n, k] * scale[n], rounded to nearest even: the weights for a bf16 matrix
   product when many activation rows share them (a prefill chunk), where the CPU's bf16 matrix
   units outrun the integer dot products above. */
void dequantize_bf16(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        __m512 s = _mm512_set1_ps(bf16_to_float(scale[n]));
        for (int64_t k = 0; k < K; k += 16) {
            int64_t left = K - k;
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            __m128i q = _mm_maskz_loadu_epi8(mask, w + n * K + k);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
            _mm256_mask_storeu_epi16(out + n * K + k, mask, to_bf16(v));
        }
    }
}

/* 16 (scale, zero) bf16 pairs as torch's int4 layout keeps them -> the 16 scales and the 16 zeros. */
static inline void scales_and_zeros(const uint32_t *pairs, __m512 *scale, __m512 *zero) {
    __m512i p = _mm512_loadu_si512(pairs);
    *scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
    *zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xFFFF0000)));
}

/* int4 weights (quant.py's Int4Linear): `packed` in torch's CPU layout, [N / 64][K][32] bytes, byte j of
   (tile t, input k) holding row 64t + j in its low nibble and row 64t + 32 + j in its high one; `sz` the
   (scale, zero) bf16 pairs tile by tile, [N / 64][K / group][64], w = (q - 8) * scale + zero (torch keeps
   them [K / group][N], where a tile's pairs for one group lie N pairs from the last group's: read along
   with a tile's sequential stream, that scattering cost glm-4-9b's one-row products a third of their
   speed, BENCHMARKS.md).
   -> out bf16 [K][rows]: rows [r0, r0 + rows) (multiples of 64) transposed, each (tile, k) 64 contiguous
   values, for x @ out. */
void dequantize_int4_bf16(const uint8_t *packed, const uint32_t *sz, int64_t N, int64_t K, int64_t group,
                          int64_t r0, int64_t rows, uint16_t *out, int threads) {
    const __m512 eight = _mm512_set1_ps(8.f);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < K; k++) {
        for (int64_t t = 0; t < rows / 64; t++) {
            int64_t tile = r0 / 64 + t;
            const uint32_t *pairs = sz + (tile * (K / group) + k / group) * 64;
            __m256i b = _mm256_loadu_si256((const __m256i *)(packed + (tile * K + k) * 32));
            __m256i nibbles[2] = {_mm256_and_si256(b, _mm256_set1_epi8(0x0F)),
                                  _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F))};
            for (int h = 0; h < 2; h++)        /* low nibbles: rows 0-31 of the tile; high: 32-63 */
                for (int part = 0; part < 2; part++) {  /* 16 rows at a time */
                    __m512 scale, zero;
                    scales_and_zeros(pairs + h * 32 + part * 16, &scale, &zero);
                    __m128i q8 = part ? _mm256_extracti128_si256(nibbles[h], 1) : _mm256_castsi256_si128(nibbles[h]);
                    __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8)), eight);
                    _mm256_storeu_si256((__m256i *)(out + k * rows + t * 64 + h * 32 + part * 16),
                                        to_bf16(_mm512_fmadd_ps(q, scale, zero)));
                }
        }
    }
}

/* The int4 stream is asked for twice: into L1 INT4_PREFETCH_L1 bytes ahead, and into L2 INT4_PREFETCH_L2
   ahead. L1 prefetches alone hold the core's few line-fill buffers for a whole trip to memory; with the L2 ones
   ahead of them, glm-4-9b's 40 layers of int4 products (qkv, o, gate_up, down) read 23-25 GB/s instead of
   15-20 (one 4096-byte L1 prefetch: 243-255 ms a token against 188-193, measured with the scales still in
   torch's layout; BENCHMARKS.md) */
#define INT4_PREFETCH_L1 2048
#define INT4_PREFETCH_L2 8192
#define INT4_ROWS 4  /* activation rows against one unpacking of the weights: 4 sums of 4 vectors each */

/* One tile's 64 outputs for `rows` (1..INT4_ROWS, a constant where inlined) activation rows: y[m][64t..]. */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *p, const uint32_t *pairs, int64_t K,
                                                            int64_t group, const int16_t *xq, const float *xs,
                                                            const float *gsum, int rows, float *y, int64_t N) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    int64_t groups = K / group;
    __m512 out[INT4_ROWS][4];
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < 4; v++) out[m][v] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        int64_t k0 = g * group;
        __m512i acc[INT4_ROWS][4];
        for (int m = 0; m < rows; m++)
            for (int v = 0; v < 4; v++) acc[m][v] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + group; k += 2) {
            _mm_prefetch((const char *)(p + k * 32 + INT4_PREFETCH_L1), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + k * 32 + INT4_PREFETCH_L2), _MM_HINT_T1);
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(p + k * 32));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(p + (k + 1) * 32));
            __m256i lo0 = _mm256_and_si256(b0, nibble), lo1 = _mm256_and_si256(b1, nibble);
            __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), nibble);
            __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), nibble);
            __m512i w[4] = {_mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(lo0, lo1)),
                            _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(lo0, lo1)),
                            _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(hi0, hi1)),
                            _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(hi0, hi1))};
            for (int m = 0; m < rows; m++) {
                const int16_t *x = xq + m * K + k;  /* inputs k and k + 1, one int32 for the pairs */
                __m512i pair = _mm512_set1_epi32((int32_t)(uint16_t)x[0] | ((int32_t)x[1] << 16));
                for (int v = 0; v < 4; v++) acc[m][v] = _mm512_dpwssd_epi32(acc[m][v], w[v], pair);
            }
        }
        const uint32_t *gp = pairs + g * 64;
        for (int v = 0; v < 4; v++) {
            __m512 scale, zero;
            scales_and_zeros(gp + v * 16, &scale, &zero);
            __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);  /* zero - 8 * scale */
            for (int m = 0; m < rows; m++) {
                /* rows 0-15, 16-31, 32-47, 48-63 of the tile, from the sums' interleaved order */
                __m512i a = acc[m][v & 2], b = acc[m][(v & 2) + 1];
                __m512i sums = _mm512_permutex2var_epi32(a, (v & 1) ? second : first, b);
                out[m][v] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums),
                                            _mm512_fmadd_ps(offset, _mm512_set1_ps(gsum[m * groups + g]), out[m][v]));
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(y + m * N + v * 16, _mm512_mul_ps(out[m][v], _mm512_set1_ps(xs[m])));
}

/* y [M, N] = xs * xq [M, K] @ W.T, activation rows quantized to int16 by quantize_rows_int16, W in the
   int4 layout above, the weights exact: per group of inputs and row, scale * sum(xq * q) * xs +
   (zero - 8 * scale) * sum(xq) * xs. Each program takes a tile of 64 rows and reads its K * 32 bytes
   in one sequential stream (again from cache for each INT4_ROWS activation rows past the first), and
   its scales in another. Two inputs at a time: their bytes interleaved per row and widened to int16
   pairs for vpdpwssd, so the 64 rows' sums sit in 4 vectors in the order {0-7, 16-23}, {8-15, 24-31},
   {32-39, 48-55}, {40-47, 56-63}; each group's sums are put back in row order before they are scaled.
   K and the group size are even; sums stay below 15 * 32767 * group. */
void int4_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N, int64_t K, int64_t group, const int16_t *xq,
               const float *xs, int64_t M, float *y, int threads) {
    int64_t groups = K / group;
    float *gsum = malloc(sizeof(float) * M * groups);  /* sum of each row's inputs in each group */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += xq[m * K + k];
            gsum[m * groups + g] = (float)s;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t tile = 0; tile < N / 64; tile++) {
        const uint8_t *p = packed + tile * K * 32;
        const uint32_t *pairs = sz + tile * groups * 64;
        for (int64_t m0 = 0; m0 < M; m0 += INT4_ROWS) {
            const int16_t *x = xq + m0 * K;
            const float *gs = gsum + m0 * groups;
            float *out = y + m0 * N + tile * 64;
            switch (M - m0 < INT4_ROWS ? M - m0 : INT4_ROWS) {
                case 1: int4_tile(p, pairs, K, group, x, xs + m0, gs, 1, out, N); break;
                case 2: int4_tile(p, pairs, K, group, x, xs + m0, gs, 2, out, N); break;
                case 3: int4_tile(p, pairs, K, group, x, xs + m0, gs, 3, out, N); break;
                default: int4_tile(p, pairs, K, group, x, xs + m0, gs, 4, out, N); break;
            }
        }
    }
    free(gsum);
}
