/* Included by decode_attention_kernel.h for the AVX2 build (HALVES): its query_step. */

/* A vector's 16 query heads as two 8-lane halves, lo and hi, each broadcast key or value element multiplying both.
 * GCC's 16-lane vectors, lowered to AVX2, kept too little in registers (0.35x PyTorch's way); here QT tokens' scores
 * for both halves take 2 * QT of the 16 registers. The arguments are the generic query_step's: q, m, l and acc [D]
 * are vecs of 16 lanes, read and written here as their two halves. */
typedef float F(half) __attribute__((vector_size(32)));
typedef int32_t F(halfi) __attribute__((vector_size(32)));
VECTOR_MATH(F(half), F(halfi), F(hsplat), F(hmax), F(hexp))

INLINE void F(query_step)(const vec *qv, const float *kf, const float *vf, int64_t D, int64_t nr, vec *mv, vec *lv,
                          vec *accv) {
    typedef F(half) half;
    const half *q = (const half *)qv;  /* [D][2] */
    half *acc = (half *)accv, *m = (half *)mv, *l = (half *)lv;  /* [D][2], [2], [2] */
    half s[NT][2], p[NT][2], alpha[2];  /* s: the scores copied out, for the loops below that index by nr */
    for (int i0 = 0; i0 < NT; i0 += QT) {
        half slo[QT], shi[QT];  /* indexed by constants only, so they stay in registers (not stored at every step) */
        for (int i = 0; i < QT; i++) slo[i] = shi[i] = F(hsplat)(0.0f);
        for (int64_t d = 0; d < D; d++) {
            const half lo = q[2 * d], hi = q[2 * d + 1];
#pragma GCC unroll 8
            for (int i = 0; i < QT; i++) {
                const half key = _mm256_broadcast_ss(kf + (i0 + i) * D + d);  /* (half){0} + x costs an add */
                slo[i] += lo * key;
                shi[i] += hi * key;
            }
        }
        for (int i = 0; i < QT; i++) s[i0 + i][0] = slo[i], s[i0 + i][1] = shi[i];
    }
    for (int k = 0; k < 2; k++) {
        half mt = m[k];
        for (int i = 0; i < nr; i++) mt = F(hmax)(mt, s[i][k]);
        alpha[k] = F(hexp)(m[k] - mt);
        l[k] *= alpha[k];
        for (int i = 0; i < NT; i++) {
            p[i][k] = i < nr ? F(hexp)(s[i][k] - mt) : F(hsplat)(0.0f);
            l[k] += p[i][k];
        }
        m[k] = mt;
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
