/* bf16 weights times a few bf16 activation rows, for decode (bf16_kernel.py builds it where the CPU
 * has AVX-512 BF16; cpu_linear.py's CpuLinear weights, plain [N, K] row-major, unchanged).
 *
 * y[m, n] = bf16(bias[n] + sum_k w[n, k] * x[m, k]), the sum in fp32 by `vdpbf16ps` (pairs of bf16
 * products added into fp32 lanes), rounded to bf16 once, to nearest even.
 *
 * A decode step is bound by reading the weights: each program takes 4 weight rows and every group of
 * up to 4 activation rows, 16 fp32 accumulators; the 4 rows come from memory on their first pass (with
 * more than one activation row, prefetched 512 bytes ahead into L1) and from L2 on the others. Through
 * all the passes, the next 4 rows are prefetched into L2, a share of their lines each pass, so that
 * the memory is read at an even pace while the later passes multiply (1-16 rows 1.1-1.3x from memory
 * on an AMD EPYC: BENCHMARKS.md). From ~8 rows the products, not the reads, bound it: the AMX kernel at
 * the end takes over from 5 rows where the CPU has it; elsewhere oneDNN from 49 (bf16_kernel.py).
 */
#include <immintrin.h>
#include <stdint.h>

#include "bf16_scalar.h"

#define PREFETCH_BYTES 512
#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* The next 4 weight rows' lines at k into L2 (next: their first, or NULL), on every passes-th call from the pass-th
 * (*wait counts down): the passes of a batch over the rows before them ask for each line once. */
static inline void next_rows_to_l2(const uint16_t *next, int64_t K, int64_t k, int *wait, int passes) {
    if (next && (*wait)-- == 0) {
        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(next + j * K + k), _MM_HINT_T1);
        *wait = passes - 1;
    }
}

/* WR (1..4) weight rows from w times MR (1..4) activation rows from x, both with stride K; into
 * y[i * N + j]. Called with constant WR and MR, so the accumulators stay in registers. first: prefetch
 * w's rows into L1; next, pass, passes: next_rows_to_l2's. */
static inline __attribute__((always_inline)) TARGET void block(const uint16_t *w, const uint16_t *x, int64_t K,
                                                               int WR, int MR, int first, const uint16_t *bias,
                                                               uint16_t *y, int64_t N, const uint16_t *next,
                                                               int pass, int passes) {
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++) acc[i][j] = _mm512_setzero_ps();
    int wait = pass;
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[4];
        for (int j = 0; j < WR; j++) {
            if (first) _mm_prefetch((const char *)(w + j * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
        }
        next_rows_to_l2(next, K, k, &wait, passes);
        for (int i = 0; i < MR; i++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
            for (int j = 0; j < WR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++)
            y[i * N + j] = to_bf16(_mm512_reduce_add_ps(acc[i][j]) + (bias ? from_bf16(bias[j]) : 0.f));
}

#define ROWS(WR, first)                                                                \
    switch (mr) {                                                                      \
        case 1: block(wb, xb, K, WR, 1, first, bb, yb, N, next, pass, passes); break;  \
        case 2: block(wb, xb, K, WR, 2, first, bb, yb, N, next, pass, passes); break;  \
        case 3: block(wb, xb, K, WR, 3, first, bb, yb, N, next, pass, passes); break;  \
        default: block(wb, xb, K, WR, 4, first, bb, yb, N, next, pass, passes); break; \
    }

/* y bf16 [M, N] = x bf16 [M, K] @ w bf16 [N, K].T (+ bias bf16 [N], or NULL); K % 32 == 0. */
TARGET void bf16_gemm(const uint16_t *w, const uint16_t *bias, int64_t N, int64_t K, const uint16_t *x, int64_t M,
                      uint16_t *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const uint16_t *wb = w + n0 * K, *bb = bias ? bias + n0 : 0;
        int wr = N - n0 < 4 ? (int)(N - n0) : 4;
        const uint16_t *next = N - n0 >= 8 ? wb + 4 * K : 0;
        int passes = (int)((M + 3) / 4);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const uint16_t *xb = x + m0 * K;
            uint16_t *yb = y + m0 * N + n0;
            int mr = M - m0 < 4 ? (int)(M - m0) : 4, pass = (int)(m0 / 4);
            if (wr == 4) {
                if (m0 == 0 && M > 1) {  /* one row: the L2 prefetches alone read quicker (BENCHMARKS.md) */
                    ROWS(4, 1)
                } else {
                    ROWS(4, 0)
                }
            } else {  /* the last rows of a weight whose N is not a multiple of 4 */
                for (int j = 0; j < wr; j++) {
                    const uint16_t *wj = wb + j * K, *bj = bb ? bb + j : 0;
                    for (int i = 0; i < mr; i++) block(wj, xb + i * K, K, 1, 1, 0, bj, yb + i * N + j, N, 0, 0, 1);
                }
            }
        }
    }
}

/* The same product on a CPU with AVX2 alone (no bf16 arithmetic): the weights widened to fp32 as they are
 * read (a shift), the activations given in fp32, 8 lanes; 4 weight rows and 2 activation rows a block
 * (8 accumulators: AVX2 has 16 registers), the next 4 rows prefetched into L2 as block() does (2-8 rows
 * 1.1-1.4x from memory with AVX-512 hidden on an AMD EPYC). bf16_kernel.py sends it up to AVX2_ROWS rows.
 * The activation rows go AVX2_PASS_BYTES of them at a time: every 4 weight rows run against all of a pass's rows,
 * which stay in cache (a prefill's 2,048 rows of glm-4-9b's 4,096 inputs are 32 MiB: read again for every 4 weight
 * rows, from memory, they made its products 2.8x slower: BENCHMARKS.md); the weights are read once a pass, once in
 * decode batches. */
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define AVX2_PASS_BYTES (4 << 20)  /* 256 rows of 4,096 fp32 inputs, 76 of 13,696 */

static inline __attribute__((always_inline)) TARGET_AVX2 void block_avx2(const uint16_t *w, const float *x,
                                                                         int64_t K, int WR, int MR, int first,
                                                                         const uint16_t *bias, uint16_t *y,
                                                                         int64_t N, const uint16_t *next,
                                                                         int pass, int passes) {
    __m256 acc[2][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++) acc[i][j] = _mm256_setzero_ps();
    int wait = pass;
    for (int64_t k = 0; k < K; k += 8) {
        __m256 wv[4];
        for (int j = 0; j < WR; j++) {
            if (first && (k & 31) == 0) _mm_prefetch((const char *)(w + j * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            __m128i b = _mm_loadu_si128((const __m128i *)(w + j * K + k));
            wv[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
        }
        if ((k & 31) == 0) next_rows_to_l2(next, K, k, &wait, passes);  /* once a line */
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            for (int j = 0; j < WR; j++) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[i * N + j] = to_bf16(_mm_cvtss_f32(h) + (bias ? from_bf16(bias[j]) : 0.f));
        }
}

/* y bf16 [M, N] = x fp32 [M, K] (bf16 values) @ w bf16 [N, K].T (+ bias bf16 [N], or NULL); K % 8 == 0. */
TARGET_AVX2 void bf16_gemm_avx2(const uint16_t *w, const uint16_t *bias, int64_t N, int64_t K, const float *x,
                                int64_t M, uint16_t *y, int threads) {
    int64_t pass = AVX2_PASS_BYTES / (4 * K) & ~(int64_t)1;  /* activation rows, even */
    if (pass < 2) pass = 2;
    for (int64_t m1 = 0; m1 < M; m1 += pass) {
        int64_t m2 = M - m1 < pass ? M : m1 + pass;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            const uint16_t *wb = w + n0 * K, *bb = bias ? bias + n0 : 0, *next = N - n0 >= 8 ? wb + 4 * K : 0;
            int wr = N - n0 < 4 ? (int)(N - n0) : 4, passes = (int)((m2 - m1 + 1) / 2);
            for (int64_t m0 = m1; m0 < m2; m0 += 2) {
                const float *xb = x + m0 * K;
                uint16_t *yb = y + m0 * N + n0;
                int two = m2 - m0 >= 2, pass = (int)((m0 - m1) / 2);
                if (wr == 4 && two)
                    block_avx2(wb, xb, K, 4, 2, m0 == m1, bb, yb, N, next, pass, passes);
                else if (wr == 4)
                    block_avx2(wb, xb, K, 4, 1, m0 == m1, bb, yb, N, next, pass, passes);
                else
                    for (int j = 0; j < wr; j++)
                        for (int i = 0; i < (two ? 2 : 1); i++)
                            block_avx2(wb + j * K, xb + i * K, K, 1, 1, 0, bb ? bb + j : 0, yb + i * N + j, N, 0, 0,
                                       1);
            }
        }
    }
}

/* GCC before 11 knows AVX-512 BF16 but not the AMX targets: there the library has the vector kernel alone
 * (bf16_kernel.amx_available() is False), as with -DNO_AMX. */
#if !defined(NO_AMX) && (defined(__clang__) || __GNUC__ >= 11)
#include "amx_tiles.h"
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

/* Batches of 5 to 128 rows on AMX tiles, where the CPU has AMX-BF16 (bf16_kernel.py). The vector
 * kernel above multiplies each weight row with each activation row in vector instructions: from 5 rows
 * that arithmetic, not the weight reads, bounds it; oneDNN reads the weight at ~2/3 of the memory's rate.
 * Here the weight is tile A as it lies (16 rows x 32 inputs, stride K) and the activations tile B, in the
 * pairs AMX wants (pack_bf16_activations). Sums in fp32 (tdpbf16ps), rounded to bf16 once with the bias, as
 * above. Each program takes 32 weight rows and the activations' groups of 16 rows two at a time, so each weight
 * tile is loaded once for every 32 activation rows; tiles 0-3 the sums (2 weight halves x 2 groups), 4-5 the
 * weights, 6-7 the activations. */

/* x bf16 [M, K] -> [ceil(M / 16)][K / 2][16] pairs of inputs (rows past M zero): row 16g + i's inputs 2p, 2p + 1
   at [g][p][i], so that 16 pairs of 16 rows are one 64-byte-a-row tile B. */
void pack_bf16_activations(const uint32_t *x, int64_t M, int64_t K, uint32_t *out) {
    int64_t pairs = K / 2;
    for (int64_t m = 0; m < (M + 15) / 16 * 16; m++) {
        uint32_t *o = out + (m / 16) * pairs * 16 + m % 16;
        for (int64_t p = 0; p < pairs; p++) o[p * 16] = m < M ? x[m * pairs + p] : 0;
    }
}

/* The sums in tiles first_tile and first_tile + 1 (the two halves of 32 weight rows from n0, activation group g)
   -> y's rows 16g.., with the bias, rounded to bf16. */
static inline AMX_TARGET void store_rows(int first_tile, int64_t g, int64_t M, int64_t N, int64_t n0,
                                         const uint16_t *bias, uint16_t *y) {
    float sums[2][16][16];
    if (first_tile == 0) {
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
    } else {
        _tile_stored(2, sums[0], 64);
        _tile_stored(3, sums[1], 64);
    }
    int64_t rows = M - g * 16 < 16 ? M - g * 16 : 16;
    for (int half = 0; half < 2; half++)
        for (int j = 0; j < 16; j++) {
            int64_t n = n0 + half * 16 + j;
            float add = bias ? from_bf16(bias[n]) : 0.f;
            for (int64_t i = 0; i < rows; i++) y[(g * 16 + i) * N + n] = to_bf16(sums[half][j][i] + add);
        }
}

/* y bf16 [M, N] = x @ w.T (+ bias), xp = pack_bf16_activations(x); N % 32 == 0, K % 32 == 0. */
AMX_TARGET void bf16_amx_gemm(const uint16_t *w, const uint16_t *bias, int64_t N, int64_t K, const uint32_t *xp,
                              int64_t M, uint16_t *y, int threads) {
    int64_t groups = (M + 15) / 16, group_pairs = K / 2 * 16;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 32) {
            const uint16_t *w0 = w + n0 * K, *w1 = w0 + 16 * K;
            for (int64_t g = 0; g < groups; g += 2) {  /* two groups of rows at a time: each weight tile loaded once */
                const uint32_t *b0 = xp + g * group_pairs, *b1 = b0 + group_pairs;
                _tile_zero(0);
                _tile_zero(1);
                if (g + 1 < groups) {
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t k = 0; k < K; k += 32) {
                        _tile_loadd(4, w0 + k, K * 2);
                        _tile_loadd(5, w1 + k, K * 2);
                        _tile_loadd(6, b0 + k / 2 * 16, 64);
                        _tile_loadd(7, b1 + k / 2 * 16, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 5, 6);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    store_rows(2, g + 1, M, N, n0, bias, y);
                } else {
                    for (int64_t k = 0; k < K; k += 32) {
                        _tile_loadd(4, w0 + k, K * 2);
                        _tile_loadd(5, w1 + k, K * 2);
                        _tile_loadd(6, b0 + k / 2 * 16, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 5, 6);
                    }
                }
                store_rows(0, g, M, N, n0, bias, y);
            }
        }
        _tile_release();
    }
}
#endif
