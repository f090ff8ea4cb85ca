/* bf16 weights times a few bf16 activation rows, for decode (bf16_kernel.py builds it where the CPU
 * has AVX-512 BF16; cpu_linear.py's CpuLinear weights, plain [N, K] row-major, unchanged).
 *
 * y[m, n] = bf16(bias[n] + sum_k w[n, k] * x[m, k]), the sum in fp32 by `vdpbf16ps` (pairs of bf16
 * products added into fp32 lanes), rounded to bf16 once, to nearest even.
 *
 * A decode step is bound by reading the weights: each program takes 4 weight rows and every group of
 * up to 4 activation rows, 16 fp32 accumulators; the 4 rows are prefetched 512 bytes ahead on their
 * first pass and come from L2 on the others. Past 4 rows the products, not the reads, bound it (oneDNN
 * takes over there, cpu_linear.py).
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_BYTES 512
#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);  /* round to nearest even */
}

static inline float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* WR (1..4) weight rows from w times MR (1..4) activation rows from x, both with stride K; into
 * y[i * N + j]. Called with constant WR and MR, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) TARGET void block(const uint16_t *w, const uint16_t *x, int64_t K,
                                                               int WR, int MR, int first, const uint16_t *bias,
                                                               uint16_t *y, int64_t N) {
    __m512 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[4];
        for (int j = 0; j < WR; j++) {
            if (first) _mm_prefetch((const char *)(w + j * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
        }
        for (int i = 0; i < MR; i++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
            for (int j = 0; j < WR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < WR; j++)
            y[i * N + j] = to_bf16(_mm512_reduce_add_ps(acc[i][j]) + (bias ? from_bf16(bias[j]) : 0.f));
}

#define ROWS(WR, first)                                                          \
    switch (mr) {                                                                \
        case 1: block(wb, xb, K, WR, 1, first, bb, yb, N); break;                \
        case 2: block(wb, xb, K, WR, 2, first, bb, yb, N); break;                \
        case 3: block(wb, xb, K, WR, 3, first, bb, yb, N); break;                \
        default: block(wb, xb, K, WR, 4, first, bb, yb, N); break;               \
    }

/* y bf16 [M, N] = x bf16 [M, K] @ w bf16 [N, K].T (+ bias bf16 [N], or NULL); K % 32 == 0. */
TARGET void bf16_gemm(const uint16_t *w, const uint16_t *bias, int64_t N, int64_t K, const uint16_t *x, int64_t M,
                      uint16_t *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const uint16_t *wb = w + n0 * K, *bb = bias ? bias + n0 : 0;
        int wr = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const uint16_t *xb = x + m0 * K;
            uint16_t *yb = y + m0 * N + n0;
            int mr = M - m0 < 4 ? (int)(M - m0) : 4;
            if (wr == 4) {
                if (m0 == 0) {
                    ROWS(4, 1)
                } else {
                    ROWS(4, 0)
                }
            } else {  /* the last rows of a weight whose N is not a multiple of 4 */
                for (int j = 0; j < wr; j++) {
                    const uint16_t *wj = wb + j * K, *bj = bb ? bb + j : 0;
                    for (int i = 0; i < mr; i++) block(wj, xb + i * K, K, 1, 1, 0, bj, yb + i * N + j, N);
                }
            }
        }
    }
}
