/* Included by decode_attention_kernel.h for the AVX2 build (HALVES). */

/* attend's twin for AVX2 (8 lanes): a vector's 16 query heads as two 8-lane halves, lo and hi, and each broadcast key
 * or value element multiplying both. GCC's 16-lane vectors, lowered to AVX2, kept too little in registers (0.35x
 * PyTorch's way); here NT tokens' scores for both halves fill 2 * NT of the 16 registers. */
typedef float F(half) __attribute__((vector_size(32)));
typedef int32_t F(halfi) __attribute__((vector_size(32)));
VECTOR_MATH(F(half), F(halfi), F(hsplat), F(hmax), F(hexp))

INLINE void F(attend_halves)(const vec *qT, int64_t q_stride, int64_t nq, int64_t first_limit, const void *kc,
                             const void *vc, int bf16, const int64_t *table, int64_t block_size, int64_t Hkv,
                             int64_t h, int64_t D, int64_t t0, int64_t t1, vec *res, int64_t res_stride) {
    typedef F(half) half;
    float kf[NT * MAX_D] __attribute__((aligned(64))), vf[NT * MAX_D] __attribute__((aligned(64)));
    const int64_t stride = Hkv * D;
    const int64_t esize = bf16 ? 2 : 4;
    half m[MAX_SPAN][2], l[MAX_SPAN][2];
    for (int64_t r = 0; r < nq; r++) {
        m[r][0] = m[r][1] = F(hsplat)(-FLT_MAX), l[r][0] = l[r][1] = F(hsplat)(0.0f);
        for (int64_t d = 0; d < D; d++) res[r * res_stride + 2 + d] = F(splat)(0.0f);
    }
    for (int64_t t = t0; t < t1;) {
        int64_t row;
        const int64_t n = F(step_at)(kc, vc, esize, table, block_size, stride, h, D, 1, t, t0, t1, &row);
        F(widen_rows)((const char *)kc + row * esize, bf16, stride, n, D, kf);
        F(widen_rows)((const char *)vc + row * esize, bf16, stride, n, D, vf);
        for (int64_t r = 0; r < nq; r++) {
            const int64_t nr = first_limit + r - t < n ? first_limit + r - t : n;  /* tokens query r sees */
            if (nr <= 0) continue;
            const half *q = (const half *)(qT + r * q_stride);  /* [D][2] */
            half *acc = (half *)(res + r * res_stride + 2);  /* [D][2] */
            half slo[NT], shi[NT];  /* indexed by constants only, so they stay in registers */
            for (int i = 0; i < NT; i++) slo[i] = shi[i] = F(hsplat)(0.0f);
            for (int64_t d = 0; d < D; d++) {
                const half lo = q[2 * d], hi = q[2 * d + 1];
#pragma GCC unroll 8
                for (int i = 0; i < NT; i++) {
                    const half key = _mm256_broadcast_ss(kf + i * D + d);  /* (half){0} + x costs an add */
                    slo[i] += lo * key;
                    shi[i] += hi * key;
                }
            }
            half s[NT][2];
            for (int i = 0; i < NT; i++) s[i][0] = slo[i], s[i][1] = shi[i];
            half p[NT][2], alpha[2];
            for (int k = 0; k < 2; k++) {
                half mt = m[r][k];
                for (int i = 0; i < nr; i++) mt = F(hmax)(mt, s[i][k]);
                alpha[k] = F(hexp)(m[r][k] - mt);
                l[r][k] *= alpha[k];
                for (int i = 0; i < NT; i++) {
                    p[i][k] = i < nr ? F(hexp)(s[i][k] - mt) : F(hsplat)(0.0f);
                    l[r][k] += p[i][k];
                }
                m[r][k] = mt;
            }
            for (int64_t d = 0; d < D; d += DT) {
                half alo[DT], ahi[DT];
                for (int j = 0; j < DT; j++) alo[j] = acc[2 * (d + j)] * alpha[0], ahi[j] = acc[2 * (d + j) + 1] * alpha[1];
#pragma GCC unroll 1  /* unrolled, GCC read each weight from memory in every product: 1.3x slower at 16K */
                for (int i = 0; i < NT; i++) {
                    const half plo = p[i][0], phi = p[i][1];  /* in registers: each serves DT products */
#pragma GCC unroll 8
                    for (int j = 0; j < DT; j++) {
                        const half value = _mm256_broadcast_ss(vf + i * D + d + j);
                        alo[j] += plo * value;
                        ahi[j] += phi * value;
                    }
                }
                for (int j = 0; j < DT; j++) acc[2 * (d + j)] = alo[j], acc[2 * (d + j) + 1] = ahi[j];
            }
        }
        t += n;
    }
    for (int64_t r = 0; r < nq; r++) {
        half *ml = (half *)(res + r * res_stride);  /* m [2], then l [2] */
        ml[0] = m[r][0], ml[1] = m[r][1], ml[2] = l[r][0], ml[3] = l[r][1];
    }
}
