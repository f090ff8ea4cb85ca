/* Activation rows to int16, one fp32 scale per row: x / xs rounded, xs = max|x| / 32767, so the
 * activations keep ~15 bits (bf16 keeps 8). Shared by int8_gemm.c and quant_avx2.c: the kernels of
 * both take the same integers. */
#ifndef GLM4SERVE_INT16_ROWS_H
#define GLM4SERVE_INT16_ROWS_H

#include <math.h>
#include <stdint.h>

void quantize_rows_int16(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
        float inv = amax > 0.f ? 32767.f / amax : 0.f;
        xs[m] = amax / 32767.f;
        for (int64_t k = 0; k < K; k++) xq[m * K + k] = (int16_t)nearbyintf(xr[k] * inv);
    }
}

#endif
